"""Post-training quantization: int8 / int4 weights (and int8 activations) for inference, on Qwix.

The numerics are Google's Qwix (``qwix.quantize``, ``qwix.dequantize``, ``qwix.einsum``): symmetric
absmax, ``s = max|w| / (qmax + 0.5)`` over a group and ``q = round(w / s)`` saturated to the integer
type (int8: -128..127, int4: -8..7; the ``+ 0.5`` makes the top bucket as wide as the others). A group is either one output channel (``block=None``: the max over all
contraction axes) or a block of ``block`` consecutive values along the last contraction axis (Q8_0 /
Q4_0 use blocks of 32; Qwix's ``tiled_axes``; a last, shorter block is allowed: zero padding). The
model surgery (which parameter becomes a ``QuantizedWeight``, its sharding names, the Orbax layout)
is this module's; Qwix's ``quantize_model`` interception is not used because the model's matmuls
already go through one function (``layers.weight_matmul``).

Modes (``MODES``; parameter kinds: the embedding table, attention q/k/v/o, the MLP, the Dense head;
each choice measured on the real weights: ``benchmarks/quant_recipes.py``, docs/quantization.md):
- ``int8-weights``: int8 in blocks of 32 for the embedding table, blocks of 8 for attention, the
  MLP and the Dense head (the bytes of int8 in blocks of 16 everywhere). The long texts of the parity
  set (1,000 to 2,050 tokens drawn from 30 words) are where int8 loses cosine, and there the loss is
  in the matmuls (attention and MLP about equally), not in the embedding table, a lookup: with only
  the table at int8 b16 the min cosine is 0.99999, with every matmul at int8 b16 0.99878. Blocks of 16
  everywhere gave 0.99878 on those texts (fp32 compute), this recipe 0.9992 (fp32) / 0.9990 (bf16);
  per output channel int8 reaches 0.9974 on the builtin parity texts;
- ``int8``: int8 weights per output channel and int8 activations, dynamic per token (the max over
  the contraction axes of each token's input), multiplied as int8 x int8 -> int32 (the v5e MXU path)
  in every attention and MLP projection; the Dense head (one pooled vector per text) has int8
  weights and an fp32 input (``PER_TOKEN_KINDS``); the embedding table is int8 per row (a lookup);
- ``int4-weights``: int4 in blocks of 32 for the embedding table (201M of the 308M parameters),
  int8 in blocks of 32 for attention, the MLP and the Dense head. int4 anywhere else costs far more
  cosine than it saves bytes: alone, the MLP at int4 (blocks of 32) drops the min cosine to 0.89,
  attention to 0.90, the Dense head to 0.98, the embedding table only to 0.994 (the old all-int4
  recipe, Q4_0-like: 0.80);
- ``mixed``: int4 in blocks of 32 for the embedding table, int8 per output channel for attention,
  the MLP and the Dense head (one scale per channel: the layout an int8 matmul can use). The card's
  ``e4_a8_f4_p4`` (MLP and head at int4 per channel too) reaches only 0.78 here with absmax rounding.

In weight-only modes the weight is dequantized in fp32 and cast to the compute dtype just before its
matmul; nothing else changes: norms, softmax, pooling, the residual stream and the final
normalisation stay fp32 as in the unquantized model. A quantized parameter is a ``QuantizedWeight``
(an ``nnx.Module`` holding the integer values and the fp32 scales as two ``nnx.Param``), put in
place of the float ``nnx.Param`` by ``quantize_module``; ``layers.weight_matmul`` and
``layers.take_rows`` are the only places that read one.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from embeddinggemma_jax.errors import ConfigError


@dataclass(frozen=True)
class Spec:
    bits: int  # 8 or 4
    block: int | None  # None: one scale per output channel

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


_B8, _C8, _B4, _C4 = Spec(8, 32), Spec(8, None), Spec(4, 32), Spec(4, None)
_B8_8 = Spec(8, 8)
# mode -> (spec per parameter kind, int8 activations?)
MODES: dict[str, tuple[dict[str, Spec], bool]] = {
    "int8-weights": ({"embed": _B8, "attn": _B8_8, "mlp": _B8_8, "head": _B8_8}, False),
    "int8": ({"embed": _C8, "attn": _C8, "mlp": _C8, "head": _C8}, True),
    "mixed": ({"embed": _B4, "attn": _C8, "mlp": _C8, "head": _C8}, False),
    "int4-weights": ({"embed": _B4, "attn": _B8, "mlp": _B8, "head": _B8}, False),
}
MODE_NAMES = tuple(MODES)
# With int8 activations, the matmuls whose input is quantized: the per-token ones (attention, MLP).
# The Dense head's input is one pooled vector per text (2 x 2 x 768 x 3072 = 9.4 MFLOPs per text
# against 203 MFLOPs per token in the encoder's projections: 0.01% at 512 tokens) and quantizing it
# costs more cosine than any single per-token matmul on the real weights (docs/quantization.md): its weights are
# int8, its input stays fp32.
PER_TOKEN_KINDS = ("attn", "mlp")

# (path of the parameter in EmbeddingGemmaModule, kind, contraction axes of one layer's weight).
# Per-layer parameters carry a leading "layers" axis in the state; the axes here are within a layer.
TARGETS: tuple[tuple[tuple[str, ...], str, tuple[int, ...]], ...] = (
    (("encoder", "embed_tokens"), "embed", (1,)),  # [V, D]: a row lookup; groups along D
    (("encoder", "layers", "self_attn", "q_proj"), "attn", (0,)),  # [D, N, H]
    (("encoder", "layers", "self_attn", "k_proj"), "attn", (0,)),  # [D, K, H]
    (("encoder", "layers", "self_attn", "v_proj"), "attn", (0,)),  # [D, K, H]
    (("encoder", "layers", "self_attn", "o_proj"), "attn", (0, 1)),  # [N, H, D]
    (("encoder", "layers", "mlp", "gate_proj"), "mlp", (0,)),  # [D, F]
    (("encoder", "layers", "mlp", "up_proj"), "mlp", (0,)),  # [D, F]
    (("encoder", "layers", "mlp", "down_proj"), "mlp", (0,)),  # [F, D]
    (("head", "dense1"), "head", (0,)),  # [D, E]
    (("head", "dense2"), "head", (0,)),  # [E, O]
)


def check_mode(mode: str | None) -> str | None:
    if mode is None or mode in MODES:
        return mode
    raise ConfigError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODE_NAMES)} (or none)")


def _qwix():
    """Qwix, the optional ``quant`` extra (imported on first use: float models do not need it)."""
    try:
        import qwix
    except ImportError:
        raise ConfigError("quantized models need Qwix: pip install 'embeddinggemma-jax[quant]' "
                          "(or pip install qwix)") from None
    return qwix


def _int_dtype(bits: int):
    return jnp.int8 if bits == 8 else jnp.int4


def _pad_axis(x, axis: int, block: int):
    pad = -x.shape[axis] % block
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _qwix_scale(scale: jax.Array, axes: tuple[int, ...], block: int | None) -> jax.Array:
    """Our scale layout -> Qwix's: blocks drop the size-1 within-block axis after the block count."""
    if block is None:
        return scale
    a = axes[-1]
    return scale.reshape(scale.shape[:a + 1] + scale.shape[a + 2:])


def quantize_array(w: jax.Array, axes: tuple[int, ...], spec: Spec) -> tuple[jax.Array, jax.Array]:
    """w (float) -> (integer values of w's shape, fp32 scales), with ``qwix.quantize`` (symmetric
    absmax). ``axes``: contraction axes of ``w``.

    Per channel the scales have w's shape with ``axes`` kept as 1; in blocks the last contraction
    axis a of size n becomes (ceil(n / block), 1) (a short last block: ``w`` is zero-padded for Qwix,
    which needs whole tiles, and the padding dropped from the values)."""
    qwix = _qwix()
    w = jnp.asarray(w, jnp.float32)
    if spec.block is None:
        qa = qwix.quantize(w, _int_dtype(spec.bits), channelwise_axes=[i for i in range(w.ndim) if i not in axes])
        return qa.qvalue, qa.scale
    a = axes[-1]
    qa = qwix.quantize(_pad_axis(w, a, spec.block), _int_dtype(spec.bits),
                       channelwise_axes=[i for i in range(w.ndim) if i != a], tiled_axes={a: spec.block})
    q = jax.lax.slice_in_dim(qa.qvalue, 0, w.shape[a], axis=a)
    return q, qa.scale.reshape(qa.scale.shape[:a + 1] + (1,) + qa.scale.shape[a + 1:])


def _group_scale(w32: np.ndarray, qmax: int) -> np.ndarray:
    """The absmax scale of a group (rows of ``w32``, fp32) per output column, formed as ``quantize_array``
    forms it through XLA: ``max|w| * (1 / (qmax + 0.5))`` in fp32, 1 where below sqrt(fp32 tiny)."""
    s = np.abs(w32).max(axis=0) * np.float32(1 / (qmax + 0.5))
    return np.where(s >= np.sqrt(np.finfo(np.float32).tiny), s, np.float32(1)).astype(np.float32)


def gptq_array(w, axes: tuple[int, ...], spec: Spec, hessian: np.ndarray, damp: float = 0.01):
    """GPTQ (Frantar et al. 2022): ``w`` -> (integer values, fp32 scales) in ``quantize_array``'s layout,
    the integers chosen one input row at a time, each row's rounding error spread over the rows not
    yet quantized through the inverse of ``hessian`` (the calibration inputs' X^T X over the flattened
    contraction axes, which must lead ``w``'s axes). A group's scale is the absmax scale of its
    (already error-corrected) rows when its first row is reached; per channel, of the original
    weight. ``damp`` x the mean diagonal is added to the Hessian's diagonal. float64, numpy; rows in
    order, no lazy batching (the reference arithmetic: ``tests/test_quant.py`` repeats it)."""
    w = np.asarray(w, np.float32)
    if tuple(axes) != tuple(range(len(axes))):
        raise ValueError(f"GPTQ needs the contraction axes first, got {axes} for shape {w.shape}")
    dims = w.shape[:len(axes)]
    n_in, n = int(np.prod(dims)), dims[-1]
    out_shape = w.shape[len(axes):]
    W = w.reshape(n_in, -1).astype(np.float64)
    H = np.array(hessian, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(n_in)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    qmax = spec.qmax
    block = spec.block or n
    nb = -(-n // block)
    Q = np.zeros(W.shape, np.int64)
    S = np.zeros((n_in // n * nb, W.shape[1]), np.float32)
    scale = _group_scale(W.astype(np.float32), qmax) if spec.block is None else None
    for r in range(n_in):
        if spec.block is not None and r % n % block == 0:
            g = r // n * nb + r % n // block
            end = min(r + block, r - r % n + n)
            scale = S[g] = _group_scale(W[r:end].astype(np.float32), qmax)
        q = np.clip(np.round(W[r].astype(np.float32) * (np.float32(1) / scale)), -qmax - 1, qmax)
        Q[r] = q
        err = (W[r] - q * scale.astype(np.float64)) / U[r, r]
        W[r + 1:] -= np.outer(U[r, r + 1:], err)
    q = jnp.asarray(Q.reshape(w.shape), _int_dtype(spec.bits))
    if spec.block is None:
        s = scale.reshape((1,) * len(axes) + out_shape)
    else:
        s = S.reshape(dims[:-1] + (nb, 1) + out_shape)
    return q, jnp.asarray(s)


def dequantize_array(q: jax.Array, scale: jax.Array, axes: tuple[int, ...], block: int | None) -> jax.Array:
    """The fp32 values ``q * scale`` stand for (``qwix.dequantize``)."""
    qwix = _qwix()
    if block is None:
        return qwix.dequantize(qwix.QArray(q, scale, qtype=q.dtype))
    a = axes[-1]
    w = qwix.dequantize(qwix.QArray(_pad_axis(q, a, block), _qwix_scale(scale, axes, block), qtype=q.dtype))
    return jax.lax.slice_in_dim(w, 0, q.shape[a], axis=a)


def quantize_activation(x: jax.Array, axes: tuple[int, ...]):
    """Dynamic int8 per token (``qwix.quantize``): one scale per position of the non-contracted axes."""
    qwix = _qwix()
    return qwix.quantize(x.astype(jnp.float32), jnp.int8, channelwise_axes=[i for i in range(x.ndim) if i not in axes])


def _parse(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    x, w = ins.split(",")
    return x, w, out


class QuantizedWeight(nnx.Module):
    """A quantized weight: ``q`` (int8 or int4) and fp32 ``scale``, with the static layout to read them."""

    def __init__(self, q: jax.Array, scale: jax.Array, axes: tuple[int, ...], block: int | None, bits: int,
                 act_bits: int | None, layered: bool, names: tuple[str | None, ...] | None = None):
        """``names``: the logical axes of the float weight (leading "layers" included when ``layered``):
        ``q`` keeps them; the scales keep those of the output axes only (their contraction axes are 1
        or a count of blocks, which a mesh axis need not divide)."""
        if names is None:
            self.q, self.scale = nnx.Param(q), nnx.Param(scale)
        else:
            off = 1 if layered else 0
            s_names = [None if i - off in axes else n for i, n in enumerate(names)]
            if block is not None:
                s_names.insert(axes[-1] + off + 1, None)
            self.q = nnx.Param(q, sharding_names=tuple(names), eager_sharding=False)
            self.scale = nnx.Param(scale, sharding_names=tuple(s_names), eager_sharding=False)
        self.axes, self.block, self.bits, self.act_bits = tuple(axes), block, bits, act_bits
        self.layered = layered  # built on a stacked [layers, ...] weight (axes are per layer)

    def dequantize(self, dtype) -> jax.Array:
        """The weight in ``dtype`` (dequantized in fp32 first). Per-layer shapes (inside the scan)."""
        return dequantize_array(self.q[...], self.scale[...], self.axes, self.block).astype(dtype)

    def einsum(self, spec: str, x: jax.Array, dtype, precision) -> jax.Array:
        """``jnp.einsum(spec, x, w)`` with this weight: dequantized (weight-only modes) or, with int8
        activations, int8 x int8 -> int32 then rescaled by the token and channel scales."""
        if self.act_bits is None:
            return jnp.einsum(spec, x, self.dequantize(dtype), precision=precision)
        if self.block is not None:  # Qwix would dequantize a weight tiled this finely before its matmul
            raise ConfigError(f"int8 activations need per-channel weights, not blocks of {self.block} ({spec})")
        xs, ws, out = _parse(spec)
        contract = [c for c in xs if c in ws and c not in out]
        qwix = _qwix()
        xq = quantize_activation(x, tuple(xs.index(c) for c in contract))
        w = qwix.QArray(self.q[...], self.scale[...], qtype=self.q[...].dtype)
        return qwix.einsum(spec, xq, w).astype(dtype)  # int8 x int8 -> int32, then x and w scales in fp32

    def take_rows(self, ids: jax.Array) -> jax.Array:
        """Rows ``ids`` of a [V, D] table, dequantized to fp32: ids [...] -> [..., D]."""
        q = jnp.take(self.q[...], ids, axis=0)
        s = jnp.take(self.scale[...], ids, axis=0)
        axes = tuple(a + ids.ndim - 1 for a in self.axes)
        return dequantize_array(q, s, axes, self.block)

    def nbytes(self) -> int:
        """Bytes of the integer values (int4 packed two to a byte) plus the fp32 scales."""
        return int(np.prod(self.q.shape)) * self.bits // 8 + int(np.prod(self.scale.shape)) * 4


def _get(module, path):
    for p in path:
        module = getattr(module, p)
    return module


def quantize_module(module, mode: str):
    """Replace the float parameters of an ``EmbeddingGemmaModule`` by ``QuantizedWeight``s (in place;
    returns the module). Works on abstract modules too (``nnx.eval_shape``)."""
    specs, act = MODES[check_mode(mode)]
    for path, kind, axes in TARGETS:
        parent = _get(module, path[:-1])
        var = getattr(parent, path[-1])
        layered = "layers" in path
        offset = 1 if layered else 0
        spec = specs.get(kind)
        if spec is None:  # a kind the recipe leaves in float
            continue
        q, scale = quantize_array(var[...], tuple(a + offset for a in axes), spec)
        act_bits = 8 if act and kind in PER_TOKEN_KINDS else None
        names = var.get_metadata().get("out_sharding")
        setattr(parent, path[-1], QuantizedWeight(q, scale, axes, spec.block, spec.bits, act_bits, layered, names))
    return module


def dequantize_module(module):
    """Put a float ``nnx.Param`` (fp32: the values ``q * scale`` stand for, exactly) back in place of
    every ``QuantizedWeight`` of an ``EmbeddingGemmaModule`` (in place; returns the module): the
    float layout ``weights.to_hf_tensors`` and the float checkpoints read. Only the quantization
    error remains; the original float weights are not recovered."""
    for path, _, _ in TARGETS:
        parent = _get(module, path[:-1])
        qw = getattr(parent, path[-1])
        if not isinstance(qw, QuantizedWeight):
            continue
        off = 1 if qw.layered else 0
        w = dequantize_array(qw.q[...], qw.scale[...], tuple(a + off for a in qw.axes), qw.block)
        names = qw.q.get_metadata().get("out_sharding")
        setattr(parent, path[-1], nnx.Param(w, sharding_names=names, eager_sharding=False) if names
                else nnx.Param(w))
    return module


def cast_float_params(module, dtype):
    """Cast the float parameters left beside the ``QuantizedWeight``s (the norms) to ``dtype`` (in place)."""
    inner = {id(v) for _, m in nnx.iter_graph(module) if isinstance(m, QuantizedWeight) for v in (m.q, m.scale)}
    for _, v in nnx.iter_graph(module):
        if isinstance(v, nnx.Param) and id(v) not in inner and jnp.issubdtype(v.dtype, jnp.floating):
            v.set_value(v.get_value().astype(dtype))
    return module


def param_bytes(module) -> int:
    """Bytes the parameters take: int4 counted packed (two per byte), float at their itemsize."""
    total = 0
    for _, m in nnx.iter_graph(module):
        if isinstance(m, QuantizedWeight):
            total += m.nbytes()
    quantized = {id(m.q) for _, m in nnx.iter_graph(module) if isinstance(m, QuantizedWeight)} | \
                {id(m.scale) for _, m in nnx.iter_graph(module) if isinstance(m, QuantizedWeight)}
    for _, v in nnx.iter_graph(module):
        if isinstance(v, nnx.Param) and id(v) not in quantized:
            total += int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
    return total


__all__ = ["MODES", "MODE_NAMES", "QuantizedWeight", "Spec", "check_mode", "dequantize_array", "dequantize_module",
           "param_bytes",
           "quantize_activation", "quantize_array", "quantize_module"]
