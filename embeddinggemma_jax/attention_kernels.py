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
- ``norm_rope_heads`` (TPUs, with splash): the q/k RMSNorm, RoPE and query scale of ``attention.Attention``
  in one Pallas pass, writing the head-major layout splash reads (XLA:TPU made three passes of them).

Both take q already scaled by ``query_pre_attn_scalar ** -0.5`` and pass ``scale=1``.
The batches of this package are right-padded: ``key_valid`` is a prefix of ones per row, which
is what the cuDNN full-layer path (key lengths) relies on.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

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
    # The backward blocks only matter to a gradient (the train step); dq and dk/dv in one fused kernel,
    # as MaxText runs splash in training.
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    return sa.make_splash_mha_single_device(sa.MultiHeadMask([one] * num_heads), block_sizes=sizes,
                                            interpret=interpret)


def _interpret(interpret: bool | None) -> bool:
    """Pallas interpret mode off a TPU; the Mosaic kernel when the step is built for TPU devices, even
    from a CPU host (``tpu_compile``)."""
    return (current_platform() or jax.default_backend()) != "tpu" if interpret is None else bool(interpret)


def splash_attention(q, k, v, key_valid, radius: int | None, dtype, interpret: bool | None = None):
    """q: [B, L, K, G, H] (scaled), k/v: [B, L, K, H] -> [B, L, K, G, H] (see ``splash_heads``)."""
    B, L, K, G, H = q.shape
    qh = q.reshape(B, L, K * G, H).transpose(0, 2, 1, 3)  # [B, N, L, H]
    out = splash_heads(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), key_valid, radius, interpret)
    return out.reshape(B, L, K, G, H).astype(dtype)


def splash_heads(qh, kh, vh, key_valid, radius: int | None, interpret: bool | None = None):
    """Splash on head-major inputs: qh [B, N, L, H] (scaled), kh/vh [B, K, L, H] -> [B, L, N, H]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    interpret = _interpret(interpret)
    B, N, L, H = qh.shape
    Lp = -(-L // SPLASH_BLOCK) * SPLASH_BLOCK  # pad to whole tiles; the pad is segment 0 (padding)
    seg = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, Lp - L)))  # [B, Lp]
    pad = ((0, 0), (0, 0), (0, Lp - L), (0, 0))
    qh, kh, vh = jnp.pad(qh, pad), jnp.pad(kh, pad), jnp.pad(vh, pad)
    kernel = _splash_kernel(Lp, N, radius, interpret)
    rows = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s1)))
    # XLA cannot partition a Mosaic kernel: on a mesh, each device runs it on its own rows.
    out = per_batch_shard(rows, 4)(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[:, :L]  # [B, L, N, H]


# ----------------------------------------------------------------------------- TPU: q/k norm + RoPE
def fused_norm_rope_fits(head_dim: int) -> bool:
    """``norm_rope_heads`` runs where each head's halves are whole 128-lane tiles (EmbeddingGemma:
    head_dim 256); other shapes keep the XLA ops."""
    return head_dim % (2 * SPLASH_BLOCK) == 0


def _row_block(L: int, most: int = 512) -> int:
    """Rows per ``norm_rope_heads`` block: the largest divisor of L up to ``most`` that is a multiple of
    16 (bf16 sublane tiles), else the whole length."""
    return next((b for b in range(min(L, most) // 16 * 16, 0, -16) if L % b == 0), L)


def norm_rope_heads(x, norm_scale, cos, sin, eps: float, out_scale: float | None = None,
                    interpret: bool | None = None):
    """``_norm_rope_pallas`` with a gradient: the forward is the Pallas pass, the backward the vjp of the
    same arithmetic in XLA ops (``_norm_rope_xla``), so a train step can run the kernel (its forward
    passes, the cached loss's first pass and remat's recompute included) and splash's own backward."""
    return _norm_rope_vjp(eps, out_scale, interpret, x, norm_scale, cos, sin)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _norm_rope_vjp(eps, out_scale, interpret, x, norm_scale, cos, sin):
    return _norm_rope_pallas(x, norm_scale, cos, sin, eps, out_scale, interpret)


def _norm_rope_fwd(eps, out_scale, interpret, x, norm_scale, cos, sin):
    return _norm_rope_pallas(x, norm_scale, cos, sin, eps, out_scale, interpret), (x, norm_scale, cos, sin)


def _norm_rope_bwd(eps, out_scale, interpret, res, g):
    _, vjp = jax.vjp(lambda *a: _norm_rope_xla(*a, eps, out_scale), *res)
    return vjp(g)


_norm_rope_vjp.defvjp(_norm_rope_fwd, _norm_rope_bwd)


def _norm_rope_xla(x, norm_scale, cos, sin, eps: float, out_scale: float | None):
    """What ``_norm_rope_pallas`` computes, in XLA ops with its roundings: [B, L, N, H] -> [B, N, L, H]."""
    dt, f32, half = x.dtype, jnp.float32, x.shape[-1] // 2
    xf = x.astype(f32)
    y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + eps)
         * (1.0 + norm_scale.astype(f32))).astype(dt)
    c, s = cos[None, :, None, :half].astype(dt), sin[None, :, None, :half].astype(dt)
    y1, y2 = y[..., :half], y[..., half:]
    out = jnp.concatenate([y1 * c - y2 * s, y2 * c + y1 * s], axis=-1)
    if out_scale is not None:
        out = out * jnp.asarray(out_scale, dt)
    return out.transpose(0, 2, 1, 3)


def _norm_rope_pallas(x, norm_scale, cos, sin, eps: float, out_scale: float | None = None,
                      interpret: bool | None = None):
    """x: [B, L, N, H] (a q or k projection) -> [B, N, L, H] in x's dtype: Gemma's RMSNorm over H (fp32,
    weight 1 + norm_scale, cast back), rotate-half RoPE (cos/sin: [L, H]) and, with ``out_scale``, the
    query scaling; the XLA path's ``RMSNorm``, ``apply_rope`` and scaling, op for op, in one Pallas pass.

    XLA:TPU ran those as three passes over HBM (the norm, the two rotated halves, their concatenation):
    ~24 of 151 projected ms per step at L = 512 (docs/tpu.md); this reads the projection once (head-major, the layout XLA:TPU gives the projection
    anyway) and writes the head-major layout splash takes."""
    from jax.experimental import pallas as pl

    B, L, N, H = x.shape
    half, dt, f32 = H // 2, x.dtype, jnp.float32
    bl = _row_block(L)
    w = (1.0 + norm_scale.astype(f32)).reshape(1, H)
    # The scale rounded to x's dtype first, as the XLA path rounds it (a Python float: no captured constant).
    scale = None if out_scale is None else float(np.asarray(out_scale, jnp.dtype(dt)).astype(np.float32))

    def rnd(v):  # fp32 arithmetic rounded to x's dtype (the identity in fp32)
        return v.astype(dt).astype(f32)

    def kernel(x_ref, w_ref, c_ref, s_ref, o_ref):
        c, s = c_ref[:, :half].astype(f32), s_ref[:, :half].astype(f32)  # both halves of the tables are equal
        for n in range(N):
            xn = x_ref[n].astype(f32)
            var = jnp.mean(jnp.square(xn), axis=-1, keepdims=True)
            y = rnd(xn * jax.lax.rsqrt(var + eps) * w_ref[...])
            y1, y2 = y[:, :half], y[:, half:]
            # Every product and sum rounded to x's dtype, as the reference's (and the XLA path's) ops are.
            for i, r in enumerate((rnd(rnd(y1 * c) - rnd(y2 * s)), rnd(rnd(y2 * c) + rnd(y1 * s)))):
                if scale is not None:
                    r = rnd(r * scale)
                o_ref[n, :, i * half:(i + 1) * half] = r.astype(dt)

    def call(x2, w, cos, sin):
        b = x2.shape[0]
        return pl.pallas_call(
            kernel, grid=(b, L // bl),
            in_specs=[pl.BlockSpec((None, N, bl, H), lambda i, j: (i, 0, j, 0)),
                      pl.BlockSpec((1, H), lambda i, j: (0, 0)),
                      pl.BlockSpec((bl, H), lambda i, j: (j, 0)),
                      pl.BlockSpec((bl, H), lambda i, j: (j, 0))],
            out_specs=pl.BlockSpec((None, N, bl, H), lambda i, j: (i, 0, j, 0)),
            out_shape=jax.ShapeDtypeStruct((b, N, L, H), dt), interpret=_interpret(interpret))(x2, w, cos, sin)

    return per_batch_shard(call, 1, replicated=3)(x.transpose(0, 2, 1, 3), w, cos, sin)


__all__ = ["attend", "cudnn_attention", "splash_attention", "splash_heads", "norm_rope_heads", "fused_norm_rope_fits",
           "IMPLS"]
