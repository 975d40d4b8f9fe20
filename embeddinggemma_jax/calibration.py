"""GPTQ calibration: each matmul's inputs on a small text set, and the module quantized with them.

``gptq_module`` walks the encoder one layer at a time, eagerly (no scan, no jit): it records the
inputs of every quantized matmul of the layer (their X^T X over real tokens, padding excluded),
quantizes the layer's weights with ``quant.gptq_array`` and runs the layer again with its quantized
weights to make the next layer's input (sequential GPTQ: each layer is calibrated on the inputs the
quantized model will give it). The embedding table is a lookup, with no input to calibrate on: it
is rounded as ``quant.quantize_array`` rounds it. The Dense head is calibrated on the pooled vectors.
The result is the ordinary ``QuantizedWeight`` layout: inference does not know how the integers
were chosen.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from embeddinggemma_jax import quant
from embeddinggemma_jax.layers import rope_tables

_SINK: dict = {}  # key -> float64 X^T X, filled by _Recorder while a layer runs eagerly
_MASK: list = [None]  # the [B, L] mask of the batch being run (None: every row is real)

_LAYER_TARGETS = [(p[2:], kind, axes) for p, kind, axes in quant.TARGETS if p[:2] == ("encoder", "layers")]


class _Recorder(quant.QuantizedWeight):
    """A float weight that adds its input's X^T X (real tokens only) to ``_SINK[key]`` on every matmul."""

    def __init__(self, w: jax.Array, key: str):  # noqa: D107 - not QuantizedWeight's fields
        self.w = nnx.Param(jnp.asarray(w, jnp.float32))
        self.key = key

    def einsum(self, spec, x, dtype, precision):
        xs, ws, out = quant._parse(spec)
        k = len([c for c in xs if c in ws and c not in out])  # contraction axes: x's trailing ones here
        X = jnp.asarray(x, jnp.float32)
        X = X.reshape(X.shape[:X.ndim - k] + (-1,))
        if _MASK[0] is not None:
            X = X * jnp.asarray(_MASK[0], jnp.float32).reshape(X.shape[:-1] + (1,))  # padding rows: zero
        X = X.reshape(-1, X.shape[-1])
        xtx = np.asarray(jnp.einsum("ti,tj->ij", X, X, precision=jax.lax.Precision.HIGHEST), np.float64)
        _SINK[self.key] = _SINK.get(self.key, 0) + xtx
        return jnp.einsum(spec, x, self.w[...].astype(dtype), precision=precision)


def _get(module, path):
    for p in path:
        module = getattr(module, p)
    return module


def gptq_module(module, specs: dict, batches: Sequence[tuple[np.ndarray, np.ndarray]], *, gptq_kinds=("attn", "mlp", "head"),
                damp: float = 0.01, log=None):
    """Quantize a float fp32 ``EmbeddingGemmaModule`` in place with ``specs`` (kind -> ``quant.Spec``;
    a kind left out stays float): GPTQ for the kinds in ``gptq_kinds``, absmax rounding for the
    others. ``batches``: (ids [B, L], mask [B, L]) of the calibration texts. Returns the module."""
    from embeddinggemma_jax.head import mean_pool

    enc = module.encoder
    cfg = enc.cfg
    if "embed" in specs:
        q, s = quant.quantize_array(enc.embed_tokens[...], (1,), specs["embed"])
        names = enc.embed_tokens.get_metadata().get("out_sharding")
        enc.embed_tokens = quant.QuantizedWeight(q, s, (1,), specs["embed"].block, specs["embed"].bits, None, False,
                                                 names)
    hs = [enc.embed(jnp.asarray(ids)).astype(jnp.float32) for ids, _ in batches]
    masks = [jnp.asarray(m) for _, m in batches]
    graphdef, lstate = nnx.split(enc.layers)
    per_layer: dict = {path: [] for path, kind, _ in _LAYER_TARGETS if kind in specs}
    for li in range(cfg.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=li: a[i], lstate))
        local = cfg.sliding_flags[li]
        base = cfg.rope_local_base_freq if local else cfg.rope_theta
        radius = cfg.window_radius if local else None

        def run(h, m):
            _MASK[0] = m
            rope = rope_tables(jnp.arange(h.shape[1]), cfg.head_dim, base, block.dtype)
            return block(h, m.astype(bool), rope, radius, "xla")

        todo = [(path, kind, axes) for path, kind, axes in _LAYER_TARGETS if kind in specs]
        _SINK.clear()
        for path, kind, _ in todo:
            if kind in gptq_kinds:
                setattr(_get(block, path[:-1]), path[-1], _Recorder(_get(block, path)[...], "/".join(path)))
        if any(kind in gptq_kinds for _, kind, _ in todo):
            for h, m in zip(hs, masks):
                run(h, m)
        for path, kind, axes in todo:
            parent, spec = _get(block, path[:-1]), specs[kind]
            cur = getattr(parent, path[-1])
            w = cur.w[...] if isinstance(cur, _Recorder) else cur[...]
            if kind in gptq_kinds:
                q, s = quant.gptq_array(np.asarray(w), axes, spec, _SINK["/".join(path)], damp)
            else:
                q, s = quant.quantize_array(w, axes, spec)
            setattr(parent, path[-1], quant.QuantizedWeight(q, s, axes, spec.block, spec.bits, None, False))
            per_layer[path].append((q, s))
        hs = [run(h, m) for h, m in zip(hs, masks)]
        if log:
            log(f"layer {li}: {', '.join(p[-1] for p, _, _ in todo)} quantized")
    for path, kind, axes in _LAYER_TARGETS:
        if kind not in specs:
            continue
        parent = _get(enc.layers, path[:-1])
        names = getattr(parent, path[-1]).get_metadata().get("out_sharding")
        q = jnp.stack([q for q, _ in per_layer[path]])
        s = jnp.stack([s for _, s in per_layer[path]])
        setattr(parent, path[-1], quant.QuantizedWeight(q, s, axes, specs[kind].block, specs[kind].bits, None, True,
                                                        names))
    if "head" in specs:
        spec = specs["head"]
        x = [mean_pool(enc.norm(h, jnp.float32), m) for h, m in zip(hs, masks)]
        for name in ("dense1", "dense2"):
            var = getattr(module.head, name)
            names = var.get_metadata().get("out_sharding")
            if "head" in gptq_kinds:
                X = np.concatenate([np.asarray(a, np.float64) for a in x])
                q, s = quant.gptq_array(np.asarray(var[...]), (0,), spec, X.T @ X, damp)
            else:
                q, s = quant.quantize_array(var[...], (0,), spec)
            qw = quant.QuantizedWeight(q, s, (0,), spec.block, spec.bits, None, False, names)
            setattr(module.head, name, qw)
            x = [qw.einsum("BD,DE->BE", a, jnp.float32, jax.lax.Precision.HIGHEST) for a in x]
    _MASK[0] = None
    _SINK.clear()
    return module
