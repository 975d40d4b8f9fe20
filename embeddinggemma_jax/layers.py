"""Building blocks: RMSNorm, rotary embeddings, the GELU-tanh MLP.

Axis alphabet used in every einsum and shape comment of this package:
  B batch, L query length, S key length, N query heads, K kv heads, G query heads per kv head,
  H head dim, D model width, F MLP width, V vocab, W local-attention window (keys per block),
  C query block size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from embeddinggemma_jax.quant import QuantizedWeight
from embeddinggemma_jax.sharding import constrain


def param(init, rngs: nnx.Rngs, shape, dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter carrying its logical axes as NNX sharding metadata: ``sharding.param_shardings``
    maps them onto a mesh (``nnx.get_partition_spec`` reads them). Nothing is placed here."""
    return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=axes, eager_sharding=False)


def precision_for(dtype) -> jax.lax.Precision:
    # fp32 means fp32: on TPU the default matmul precision would silently drop to bf16 passes.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def weight_matmul(spec: str, x: jax.Array, w, dtype, precision) -> jax.Array:
    """``einsum(spec, x, w)`` for a float ``nnx.Param`` (cast to ``dtype``) or a ``QuantizedWeight``."""
    if isinstance(w, QuantizedWeight):
        return w.einsum(spec, x, dtype, precision)
    return jnp.einsum(spec, x, w[...].astype(dtype), precision=precision)


def take_rows(table, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` of a [V, D] table (float ``nnx.Param`` or ``QuantizedWeight``), before any cast."""
    if isinstance(table, QuantizedWeight):
        return table.take_rows(ids)
    return jnp.take(table[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in fp32, cast back.

    The stored weight is an offset from one (zero-initialised), as in the reference.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, axis: str = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), sharding_names=(axis,), eager_sharding=False)

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        # Upstream (transformers Gemma3RMSNorm) multiplies by (1 + w) in fp32 too, then casts back.
        y = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + self.scale[...].astype(jnp.float32))
        return y.astype(out_dtype or x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, base: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin for rotate-half RoPE: inv_freq and angles in fp32, then cast to the compute dtype.

    positions: [L] int -> cos, sin: [L, H]
    """
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [L, H/2]
    emb = jnp.concatenate([angles, angles], axis=-1)  # [L, H]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, L, heads, H]; cos/sin: [L, H]. Rotate-half (not interleaved), in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :half], sin[None, :, None, :half]  # both halves of cos/sin are equal
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class MLP(nnx.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, d: int, f: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.gate_proj = param(init, rngs, (d, f), param_dtype, ("embed", "mlp"))  # [D, F]
        self.up_proj = param(init, rngs, (d, f), param_dtype, ("embed", "mlp"))  # [D, F]
        self.down_proj = param(init, rngs, (f, d), param_dtype, ("mlp", "embed"))  # [F, D]
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        p = precision_for(self.dtype)
        gate = weight_matmul("BLD,DF->BLF", x, self.gate_proj, self.dtype, p)
        up = weight_matmul("BLD,DF->BLF", x, self.up_proj, self.dtype, p)
        hidden = constrain(jax.nn.gelu(gate, approximate=True) * up,
                           ("activation_batch", "activation_length", "activation_mlp"))
        return weight_matmul("BLF,FD->BLD", hidden, self.down_proj, self.dtype, p)
