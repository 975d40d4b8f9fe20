"""Grouped-query attention for the encoder, and the choice of kernel that computes it.

Every kernel computes the same function (bidirectional; a symmetric ``|i - j| <= radius`` window
on sliding layers; padding masks keys only; see ``attention_xla``):
- ``xla``: the XLA kernels of ``attention_xla`` (everywhere; the reference path);
- ``cudnn`` / ``splash``: the GPU and TPU kernels of ``attention_kernels``.
``select_impl`` is the one place that chooses among them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from embeddinggemma_jax import attention_kernels
from embeddinggemma_jax.attention_xla import xla_attention
from embeddinggemma_jax.layers import RMSNorm, apply_rope, param, precision_for, weight_matmul
from embeddinggemma_jax.sharding import constrain

IMPLS = ("xla",) + attention_kernels.IMPLS


def select_impl(backend: str | None = None, dtype=None) -> str:
    """The kernel for ``backend`` (default: JAX's) and compute ``dtype``: cuDNN on GPUs, splash on
    TPUs, XLA elsewhere. cuDNN's flash attention has no fp32 kernel, so fp32 on a GPU is XLA."""
    backend = backend or jax.default_backend()
    impl = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
    if impl == "cudnn" and dtype is not None and jnp.dtype(dtype) == jnp.float32:
        return "xla"
    return impl


# Splash pads every sequence to whole 128-token tiles and keeps per-tile buffers: below 128 tokens,
# or where the padding to the next tile is a large part of it, XLA attention needs far less HBM
# and time (compiled for v5e by ``embeddinggemma-jax tpu-compile``; docs/tpu.md).
SPLASH_MIN_LENGTH = 128
SPLASH_MAX_TILE_PADDING = 0.15


def kernel_for_length(impl: str, length: int) -> str:
    """The kernel that runs a sequence of ``length`` tokens: splash only from SPLASH_MIN_LENGTH tokens
    where padding to whole tiles adds at most SPLASH_MAX_TILE_PADDING of the padded length; else XLA."""
    if impl != "splash":
        return impl
    tiles = -(-length // attention_kernels.SPLASH_BLOCK) * attention_kernels.SPLASH_BLOCK
    if length < SPLASH_MIN_LENGTH or tiles - length > SPLASH_MAX_TILE_PADDING * tiles:
        return "xla"
    return impl


def attend(q, k, v, key_valid, radius: int | None, dtype, impl: str = "xla"):
    """q: [B, L, K, G, H] (scaled), k/v: [B, L, K, H], key_valid: [B, L] -> [B, L, K, G, H].
    ``radius`` None means a full-attention layer. ``impl`` "splash" runs XLA where splash does not
    pay (``kernel_for_length``)."""
    impl = kernel_for_length(impl, q.shape[1])
    if impl == "xla":
        return xla_attention(q, k, v, key_valid, radius, dtype)
    if impl in attention_kernels.IMPLS:
        return attention_kernels.attend(q, k, v, key_valid, radius, dtype, impl)
    raise ValueError(f"unknown attention impl {impl!r}; choose {', '.join(repr(i) for i in IMPLS)}")


class Attention(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param(init, rngs, (D, N, H), param_dtype, ("embed", "q_heads", "head_dim"))
        self.k_proj = param(init, rngs, (D, K, H), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(init, rngs, (D, K, H), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(init, rngs, (N, H, D), param_dtype, ("q_heads", "head_dim", "embed"))
        self.q_norm = RMSNorm(H, cfg.rms_norm_eps, param_dtype=param_dtype, axis="head_dim")
        self.k_norm = RMSNorm(H, cfg.rms_norm_eps, param_dtype=param_dtype, axis="head_dim")
        self.num_kv_heads, self.num_groups = K, N // K
        self.query_scale = cfg.query_scale
        self.dtype = dtype

    def __call__(self, x, key_valid, rope, radius: int | None, impl: str = "xla"):
        """x: [B, L, D]; rope: (cos, sin) each [L, H]; radius None for full attention."""
        dt, p = self.dtype, precision_for(self.dtype)
        B, L, _ = x.shape
        q = weight_matmul("BLD,DNH->BLNH", x, self.q_proj, dt, p)
        k = weight_matmul("BLD,DKH->BLKH", x, self.k_proj, dt, p)
        v = weight_matmul("BLD,DKH->BLKH", x, self.v_proj, dt, p)
        if kernel_for_length(impl, L) == "splash" and attention_kernels.fused_norm_rope_fits(q.shape[-1]):
            # The TPU path: q/k norm, RoPE and the query scale in one Pallas pass each, head-major for splash.
            qh = attention_kernels.norm_rope_heads(q, self.q_norm.scale[...], *rope, self.q_norm.eps,
                                                   self.query_scale)
            kh = attention_kernels.norm_rope_heads(k, self.k_norm.scale[...], *rope, self.k_norm.eps)
            out = attention_kernels.splash_heads(qh, kh, v.transpose(0, 2, 1, 3), key_valid, radius).astype(dt)
            return weight_matmul("BLNH,NHD->BLD", out, self.o_proj, dt, p)
        # q/k norms come before RoPE, as in Gemma-3.
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        # 1/16 is a power of two: scaling q is bit-identical to scaling the scores.
        q = (q * jnp.asarray(self.query_scale, dt)).reshape(B, L, self.num_kv_heads, self.num_groups, -1)
        q = constrain(q, ("activation_batch", "activation_length", "activation_kv_heads", None, "activation_head_dim"))
        out = attend(q, k, v, key_valid, radius, dt, impl)  # [B, L, K, G, H]
        out = out.reshape(B, L, self.num_kv_heads * self.num_groups, -1)
        return weight_matmul("BLNH,NHD->BLD", out, self.o_proj, dt, p)


__all__ = ["Attention", "attend", "select_impl", "kernel_for_length", "IMPLS"]
