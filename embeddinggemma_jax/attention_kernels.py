"""Accelerator attention kernels, each computing exactly what the XLA path (``attention_xla``) does.

- ``cudnn`` (GPUs): ``jax.nn.dot_product_attention`` with ``implementation="cudnn"``.
  cuDNN's flash attention only takes bf16/fp16 and only a *left* sliding window (or a causal
  one), while EmbeddingGemma's window is symmetric (``|i - j| <= radius``). So:
  full layers use the kernel with key padding as per-row key lengths; sliding layers run it on
  the same blocked layout as the XLA path (``attention_xla.local_windows``: each block of C queries
  against its 2p+1 key blocks) with the band and padding as a boolean mask, so they stay linear
  in L. fp32 is not a cuDNN flash-attention dtype: ``attention.select_impl`` sends fp32 to XLA.
- ``splash`` (TPUs): Pallas splash attention with ``LocalMask((radius, radius))`` on sliding
  layers and ``FullMask`` on full layers; key padding as segment ids (a real token is segment 1,
  padding segment 0, so a padded query attends only to padding: finite, and dropped by the
  pooling). Off a TPU it runs in Pallas interpret mode (how the parity tests run it on a CPU); a
  step built on a mesh of TPU devices (``sharding.use_rules``) gets the Mosaic kernel.

Both take q already scaled by ``query_pre_attn_scalar ** -0.5`` and pass ``scale=1``.
The batches of this package are right-padded: ``key_valid`` is a prefix of ones per row, which
is what the cuDNN full-layer path (key lengths) relies on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from embeddinggemma_jax.attention_xla import local_windows, use_local
from embeddinggemma_jax.sharding import current_platform, per_batch_shard

IMPLS = ("cudnn", "splash")
SPLASH_BLOCK = 128  # TPU lane width: splash tiles are multiples of it


def attend(q, k, v, key_valid, radius: int | None, dtype, impl: str, *, dpa_implementation: str | None = "cudnn",
           interpret: bool | None = None):
    """q: [B, L, K, G, H] (scaled), k/v: [B, L, K, H], key_valid: [B, L] bool -> [B, L, K, G, H].

    ``dpa_implementation`` / ``interpret`` exist for the tests: the cuDNN code path with
    ``jax.nn.dot_product_attention``'s XLA implementation, and splash in interpret mode.
    """
    if impl == "cudnn":
        return cudnn_attention(q, k, v, key_valid, radius, dtype, dpa_implementation)
    if impl == "splash":
        return splash_attention(q, k, v, key_valid, radius, dtype, interpret)
    raise ValueError(f"unknown attention impl {impl!r}; choose 'xla', {', '.join(repr(i) for i in IMPLS)}")


# ----------------------------------------------------------------------------- GPU: cuDNN
def _dpa(q, k, v, mask, lengths, implementation):
    """q: [b, T, K, G, H], k/v: [b, S, K, H]; mask [b, 1, T, S] bool or None; lengths [b] or None."""
    b, T, K, G, H = q.shape
    out = jax.nn.dot_product_attention(q.reshape(b, T, K * G, H), k, v, mask=mask, scale=1.0,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out.reshape(b, T, K, G, H)


def cudnn_attention(q, k, v, key_valid, radius: int | None, dtype, implementation: str | None = "cudnn"):
    if implementation == "cudnn" and jnp.dtype(dtype) == jnp.float32:
        raise ValueError("cuDNN flash attention has no float32 kernel; use attention_impl='xla' for float32 "
                         "(attention.select_impl does)")
    B, L, K, G, H = q.shape
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if radius is None:
        # At least one key per row: the all-padding rows that fill a batch stay finite.
        lengths = jnp.maximum(key_valid.sum(-1), 1).astype(jnp.int32)
        return _dpa(q, k, v, None, lengths, implementation)
    if use_local(L, radius):
        qb, kw, vw, mask = local_windows(q, k, v, key_valid, radius)
        nb, C, W = qb.shape[1], qb.shape[2], kw.shape[2]
        # A query block past the end of a short row sees no valid key: let it see its own window
        # (its output is padding, dropped by the pooling) rather than an all-masked row.
        mask = mask | ~mask.any(-1, keepdims=True)
        out = _dpa(qb.reshape(B * nb, C, K, G, H), kw.reshape(B * nb, W, K, H), vw.reshape(B * nb, W, K, H),
                   mask.reshape(B * nb, 1, C, W), None, implementation)
        return out.reshape(B, nb * C, K, G, H)[:, :L]
    pos = jnp.arange(L)
    band = jnp.abs(pos[:, None] - pos[None, :]) <= radius
    mask = key_valid[:, None, None, :] & band[None, None]  # [B, 1, L, S]
    mask = mask | ~mask.any(-1, keepdims=True)
    return _dpa(q, k, v, mask, None, implementation)


# ----------------------------------------------------------------------------- TPU: splash
def _splash_kernel(L: int, num_heads: int, radius: int | None, interpret: bool):
    # Built per trace, not cached: the kernel holds arrays made while tracing.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    one = sa.LocalMask((L, L), (radius, radius), 0) if radius is not None else sa.FullMask((L, L))
    block = next(b for b in (4 * SPLASH_BLOCK, 2 * SPLASH_BLOCK, SPLASH_BLOCK) if L % b == 0)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    return sa.make_splash_mha_single_device(sa.MultiHeadMask([one] * num_heads), block_sizes=sizes,
                                            interpret=interpret)


def splash_attention(q, k, v, key_valid, radius: int | None, dtype, interpret: bool | None = None):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    if interpret is None:  # the Mosaic kernel when the step is built for TPU devices, even from a CPU host
        interpret = (current_platform() or jax.default_backend()) != "tpu"
    B, L, K, G, H = q.shape
    Lp = -(-L // SPLASH_BLOCK) * SPLASH_BLOCK  # pad to whole tiles; the pad is segment 0 (padding)
    pad = ((0, 0), (0, Lp - L))
    seg = jnp.pad(key_valid.astype(jnp.int32), pad)  # [B, Lp]
    qh = jnp.pad(q, pad + ((0, 0),) * 3).reshape(B, Lp, K * G, H).transpose(0, 2, 1, 3)  # [B, N, Lp, H]
    kh = jnp.pad(k, pad + ((0, 0),) * 2).transpose(0, 2, 1, 3)  # [B, K, Lp, H]
    vh = jnp.pad(v, pad + ((0, 0),) * 2).transpose(0, 2, 1, 3)
    kernel = _splash_kernel(Lp, K * G, radius, bool(interpret))
    rows = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s1)))
    # XLA cannot partition a Mosaic kernel: on a mesh, each device runs it on its own rows.
    out = per_batch_shard(rows, 4)(qh, kh, vh, seg)
    out = out.transpose(0, 2, 1, 3)[:, :L]  # [B, L, N, H]
    return out.reshape(B, L, K, G, H).astype(dtype)


__all__ = ["attend", "cudnn_attention", "splash_attention", "IMPLS"]
