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

MIN_DIMENSIONS, MAX_DIMENSIONS = 32, 8192
_HI = jax.lax.Precision.HIGHEST


def mean_pool(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """tokens [B, L, D], mask [B, L] -> [B, D] in fp32: mean over non-padding tokens."""
    m = mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(tokens.astype(jnp.float32) * m, axis=1)
    return summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)  # sentence-transformers clamps at 1e-9


def l2_normalize(x, eps: float = 1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)  # torch F.normalize


class Head(nnx.Module):
    def __init__(self, cfg: HeadConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.dense1 = nnx.Param(init(rngs.params(), (cfg.in_features, cfg.hidden_features), param_dtype))
        self.dense2 = nnx.Param(init(rngs.params(), (cfg.hidden_features, cfg.out_features), param_dtype))

    def __call__(self, pooled: jax.Array) -> jax.Array:
        """pooled [B, D] fp32 -> Dense head output [B, out] fp32 (not normalised)."""
        x = jnp.einsum("BD,DE->BE", pooled, self.dense1[...].astype(jnp.float32), precision=_HI)
        return jnp.einsum("BE,EO->BO", x, self.dense2[...].astype(jnp.float32), precision=_HI)


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
        x = l2_normalize(x) if xp is jnp else _np_l2(x)
    if d > full:
        pad = [(0, 0)] * (x.ndim - 1) + [(0, d - full)]
        x = xp.pad(x, pad)
    return x


def _np_l2(x):
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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



