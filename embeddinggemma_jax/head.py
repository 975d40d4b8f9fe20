"""Mean pooling, the two Dense layers, L2 normalisation and Matryoshka dimensions.

The head runs in fp32 whatever the encoder's compute dtype: it is a few matmuls per *text*, so
the precision is free, and it keeps bf16 runs closest to the fp32 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.encoder import Encoder
from embeddinggemma_jax.layers import param, weight_matmul
from embeddinggemma_jax.quant import quantize_module

MIN_DIMENSIONS, MAX_DIMENSIONS = 32, 8192
_HI = jax.lax.Precision.HIGHEST


def mean_pool(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """tokens [B, L, D], mask [B, L] -> [B, D] in fp32: mean over non-padding tokens."""
    m = mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(tokens.astype(jnp.float32) * m, axis=1)
    return summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)  # sentence-transformers clamps at 1e-9


def l2_normalize(x, eps: float = 1e-12):
    """``x / max(||x||, eps)`` over the last axis in fp32, as torch's ``F.normalize``: the one L2
    normalisation of the package. numpy in, numpy out; anything else goes through jax.numpy."""
    xp = np if isinstance(x, (np.ndarray, np.generic, list, tuple)) else jnp
    x = xp.asarray(x).astype(xp.float32)
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Head(nnx.Module):
    def __init__(self, cfg: HeadConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        D, E, O = cfg.in_features, cfg.hidden_features, cfg.out_features
        self.dense1 = param(init, rngs, (D, E), param_dtype, ("embed", "dense_hidden"))  # [D, E]
        self.dense2 = param(init, rngs, (E, O), param_dtype, ("dense_hidden", "dense_out"))  # [E, O]

    def __call__(self, pooled: jax.Array) -> jax.Array:
        """pooled [B, D] fp32 -> Dense head output [B, out] fp32 (not normalised)."""
        x = weight_matmul("BD,DE->BE", pooled, self.dense1, jnp.float32, _HI)
        return weight_matmul("BE,EO->BO", x, self.dense2, jnp.float32, _HI)


class EmbeddingGemmaModule(nnx.Module):
    """Encoder -> mean pooling -> Dense -> Dense. Normalisation is left to the caller (and to
    ``embed``) because Matryoshka truncation must happen before re-normalising."""

    def __init__(self, enc: EncoderConfig, head: HeadConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.encoder = Encoder(enc, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = Head(head, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids, mask, *, impl: str = "xla", remat: bool = False):
        """ids, mask [B, L] -> unnormalised embeddings [B, out] fp32."""
        tokens = self.encoder(ids, mask, impl=impl, remat=remat)
        return self.head(mean_pool(tokens, mask))


def abstract_module(enc: EncoderConfig, head: HeadConfig, dtype="float32", param_dtype="float32",
                    quantize: str | None = None):
    """The model with ShapeDtypeStruct leaves: shapes, logical axes and parameter count without allocating.
    With ``quantize``, the layout of that ``quant`` mode (integer values and scales)."""
    def build():
        module = EmbeddingGemmaModule(enc, head, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                                      rngs=nnx.Rngs(0))
        return quantize_module(module, quantize) if quantize else module

    return nnx.eval_shape(build)


def make_forward(graphdef, *, prepare=None, on_trace=None, **call_kw):
    """The model's forward as a pure function ``(state, ids, mask) -> [rows, out] fp32``: the module is
    rebuilt from ``graphdef`` and ``prepare(state)`` (the states ``nnx.merge`` takes; default ``(state,)``)
    and called with ``call_kw`` (e.g. ``impl=``, ``remat=``). ``on_trace`` runs each time JAX traces it.
    The one forward of the API, the batch job, the server and training (``jit_forward``)."""
    def forward(state, ids, mask):
        if on_trace is not None:
            on_trace()
        states = (state,) if prepare is None else prepare(state)
        return nnx.merge(graphdef, *states)(ids, mask, **call_kw)

    return forward


def jit_forward(graphdef, *, prepare=None, on_trace=None, call_kw: dict | None = None, **jit_kw):
    """``jax.jit`` of ``make_forward`` (``jit_kw``: in/out shardings and the like)."""
    return jax.jit(make_forward(graphdef, prepare=prepare, on_trace=on_trace, **(call_kw or {})), **jit_kw)


def count_params(module_or_state) -> int:
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def apply_dimensions(x: jax.Array, dimensions: int | None, normalize: bool):
    """Matryoshka truncation (first d components) or zero padding, then optional L2 normalisation.

    Works on numpy or jax arrays [..., out].
    """
    xp = jnp if isinstance(x, jax.Array) else np
    full = x.shape[-1]
    d = check_dimensions(dimensions, full)
    if d < full:
        x = x[..., :d]
    if normalize:
        x = l2_normalize(x)
    if d > full:
        pad = [(0, 0)] * (x.ndim - 1) + [(0, d - full)]
        x = xp.pad(x, pad)
    return x


def check_dimensions(dimensions, full: int) -> int:
    if dimensions is None:
        return full
    if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)):
        raise ValueError(f"dimensions must be an integer between {MIN_DIMENSIONS} and {MAX_DIMENSIONS}, "
                         f"got {dimensions!r}")
    if not MIN_DIMENSIONS <= dimensions <= MAX_DIMENSIONS:
        raise ValueError(f"dimensions={dimensions} is out of range: use {MIN_DIMENSIONS} <= d < {full} to truncate "
                         f"(Matryoshka), {full} for the full vector, or up to {MAX_DIMENSIONS} to zero-pad")
    return int(dimensions)



