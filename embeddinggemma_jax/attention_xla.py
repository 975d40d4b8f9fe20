"""The XLA attention kernels: bidirectional grouped-query attention with a symmetric local window.

Masks (nothing is causal):
- full layers: a query sees every non-padding key;
- sliding layers: a query at i sees a non-padding key at j iff ``|i - j| <= radius``
  (radius = configured sliding_window // 2 = 256 for EmbeddingGemma).
Padding masks keys only. A padded query far from every real token can have all its keys masked
on a sliding layer, so the mask value is finite: softmax then stays finite (such rows are dropped
by the pooling), where ``-inf`` would give NaN.

Two kernels compute the same function:
- ``dense_attention``: every key for every query, with the mask applied (full layers; short
  inputs), in chunks of ``QUERY_CHUNK`` queries one after another;
- ``local_attention``: queries in blocks of C, each against its own window of C + 2P keys, so
  sliding layers cost time linear in L; blocks run one after another.
``local_windows`` (the blocked layout) is shared with the accelerator kernels in
``attention_kernels``. This module is a leaf: it imports nothing from the attention dispatcher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from embeddinggemma_jax.layers import precision_for

# Finite and far below any real score, with headroom so adding a score cannot overflow.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _softmax_attend(q, k, v, mask, dtype, precision):
    """q: [B, ..., L, K, G, H], k/v: [B, ..., S, K, H], mask broadcastable to [B, ..., K, G, L, S].

    The G query heads sharing a kv head are folded into the query axis ([..., K, L*G, H]), so both
    einsums are plain batched matmuls over K: on CPU that is faster than letting XLA transpose the
    scores between the two dots (docs/benchmarks.md).
    """
    *bt, L, K, G, H = q.shape
    S = k.shape[-3]
    n = len(bt)
    q2 = q.transpose(tuple(range(n)) + (n + 1, n, n + 2, n + 3)).reshape(*bt, K, L * G, H)  # [.., K, LG, H]
    k2, v2 = jnp.moveaxis(k, -2, -3), jnp.moveaxis(v, -2, -3)  # [.., K, S, H]
    # Scores leave the matmul in fp32 (the MXU accumulates in fp32 anyway): rounding them to bf16
    # moves a logit of 40 by +-0.125, enough to cost a short text 5e-4 of cosine against fp32.
    scores = jnp.einsum("...KQH,...KSH->...KQS", q2, k2, precision=precision, preferred_element_type=jnp.float32)
    scores = jnp.where(jnp.swapaxes(mask, -3, -2), scores.reshape(*bt, K, L, G, S), MASK_VALUE)
    # The probabilities stay fp32 through the PV product (v has a single kv head: the cast is cheap).
    # In bf16 this is what keeps short, ill-conditioned inputs within 5e-4 cosine of the fp32 model.
    probs = jax.nn.softmax(scores, axis=-1).reshape(*bt, K, L * G, S)
    out = jnp.einsum("...KQS,...KSH->...KQH", probs, v2.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)  # [.., K, LG, H]
    return jnp.moveaxis(out.reshape(*bt, K, L, G, H), -4, -3).astype(dtype)  # [.., L, K, G, H]


# Queries per step of the XLA path. On CPU, scores for a 256-query chunk stay in cache, where the
# whole [L, S] matrix streams through memory (measured in benchmarks/profile_long.py).
QUERY_CHUNK = 256


def _map_chunks(fn, *xs):
    """``fn`` over axis 1 of each x, one slice at a time (``lax.map``): the working set is one slice."""
    out = jax.lax.map(lambda a: fn(*a), tuple(jnp.moveaxis(x, 1, 0) for x in xs))
    return jnp.moveaxis(out, 0, 1)


def dense_attention(q, k, v, key_valid, radius: int | None, dtype):
    """q: [B, L, K, G, H] (already scaled), k/v: [B, L, K, H], key_valid: [B, L] bool.

    Queries go through in chunks of ``QUERY_CHUNK`` against all keys (a full layer stays dense)."""
    B, L, K, G, H = q.shape
    C = QUERY_CHUNK if L > QUERY_CHUNK and L % QUERY_CHUNK == 0 else L
    key_pos = jnp.arange(L)

    def chunk(qc, start):  # qc: [B, C, K, G, H], start: [1], the chunk's first query position
        mask = key_valid[:, None, None, None, :]  # [B, 1, 1, 1, S]
        if radius is not None:
            pos = start[0] + jnp.arange(C)
            mask = mask & (jnp.abs(pos[:, None] - key_pos[None, :]) <= radius)[None, None, None]
        return _softmax_attend(qc, k, v, mask, dtype, precision_for(dtype))

    if C == L:
        return chunk(q, jnp.zeros((1,), jnp.int32))
    starts = jnp.arange(0, L, C)[None]  # [1, L // C]: mapped over axis 1 like the queries
    return _map_chunks(chunk, q.reshape(B, L // C, C, K, G, H), starts).reshape(B, L, K, G, H)


def local_block_size(radius: int) -> int:
    return max(1, radius)


def local_windows(q, k, v, key_valid, radius: int, block: int | None = None):
    """The blocked layout of sliding-window attention, shared by every kernel that uses it.

    Queries [b*C, (b+1)*C) can only see keys in [b*C - radius, (b+1)*C + radius), which lies inside
    the key blocks b-p .. b+p (p = ceil(radius / C)); each query block gets those 2p+1 blocks
    (W = (2p+1)*C keys) and the exact ``|i - j| <= radius`` mask.
    Returns qb [B, nb, C, K, G, H], kw/vw [B, nb, W, K, H], mask [B, nb, C, W].
    """
    B, L, K, G, H = q.shape
    C = block or local_block_size(radius)
    p = -(-radius // C)
    nb = -(-L // C)
    pad_end = nb * C - L
    # Pad queries to whole blocks; pad keys by p blocks on each side as well.
    q = jnp.pad(q, ((0, 0), (0, pad_end), (0, 0), (0, 0), (0, 0)))
    kv_pad = ((0, 0), (p * C, pad_end + p * C), (0, 0), (0, 0))
    k = jnp.pad(k, kv_pad)
    v = jnp.pad(v, kv_pad)
    valid = jnp.pad(key_valid, ((0, 0), (p * C, pad_end + p * C)))  # padding positions are invalid

    qb = q.reshape(B, nb, C, K, G, H)
    kb = k.reshape(B, nb + 2 * p, C, K, H)
    vb = v.reshape(B, nb + 2 * p, C, K, H)
    mb = valid.reshape(B, nb + 2 * p, C)
    # Window of block b = key blocks b .. b+2p of the padded keys.
    kw = jnp.concatenate([kb[:, j:j + nb] for j in range(2 * p + 1)], axis=2)  # [B, nb, W, K, H]
    vw = jnp.concatenate([vb[:, j:j + nb] for j in range(2 * p + 1)], axis=2)
    mw = jnp.concatenate([mb[:, j:j + nb] for j in range(2 * p + 1)], axis=2)  # [B, nb, W]

    # Absolute positions: query b*C + c, key (b - p)*C + w.
    rel = (jnp.arange(2 * p + 1) * C)[:, None] + jnp.arange(C)[None, :]  # [2p+1, C]
    rel = rel.reshape(-1) - p * C  # key offset from the block start, [W]
    dist = rel[None, :] - jnp.arange(C)[:, None]  # [C, W]: j - i, independent of b
    band = jnp.abs(dist) <= radius
    mask = mw[:, :, None, :] & band[None, None]  # [B, nb, C, W]
    return qb, kw, vw, mask


def local_attention(q, k, v, key_valid, radius: int, dtype, block: int | None = None):
    """Sliding-window attention in query blocks (see ``local_windows``): time and memory linear in L.

    Blocks run one after another, so one block's scores are the working set."""
    B, L, K, G, H = q.shape
    qb, kw, vw, mask = local_windows(q, k, v, key_valid, radius, block)
    nb, C = qb.shape[1], qb.shape[2]

    def block(qc, kc, vc, mc):  # one query block against its window
        return _softmax_attend(qc, kc, vc, mc[:, None, None], dtype, precision_for(dtype))

    out = _map_chunks(block, qb, kw, vw, mask)  # [B, nb, C, K, G, H], one block at a time
    return out.reshape(B, nb * C, K, G, H)[:, :L]


def use_local(L: int, radius: int) -> bool:
    """Blocked attention pays off once its window is shorter than the sequence."""
    C = local_block_size(radius)
    return L > (2 * (-(-radius // C)) + 1) * C


def xla_attention(q, k, v, key_valid, radius: int | None, dtype):
    """The XLA path: blocked local attention where its window is shorter than the row, else dense."""
    if radius is not None and use_local(q.shape[1], radius):
        return local_attention(q, k, v, key_valid, radius, dtype)
    return dense_attention(q, k, v, key_valid, radius, dtype)


__all__ = ["MASK_VALUE", "QUERY_CHUNK", "dense_attention", "local_attention", "local_windows", "use_local",
           "xla_attention"]
