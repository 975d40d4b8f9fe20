"""Contrastive losses equal to sentence-transformers' ``MultipleNegativesRankingLoss`` and
``MatryoshkaLoss`` (the default configuration of each: query->document, one joint softmax).

Shapes: ``queries`` [B, d], ``docs`` [B * (1 + n), d]: the B positives first, then the hard
negatives column by column, exactly as sentence-transformers concatenates its input columns.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from embeddinggemma_jax.head import l2_normalize

_HI = jax.lax.Precision.HIGHEST
DEFAULT_MATRYOSHKA_DIMS = (768, 512, 256, 128)


def multiple_negatives_ranking_loss(queries: jax.Array, docs: jax.Array, scale: float = 20.0) -> jax.Array:
    """Cross-entropy of each query against every document of the batch; the positive of query i
    is document i. Cosine scores times ``scale`` (20 = temperature 0.05)."""
    q = l2_normalize(queries)
    d = l2_normalize(docs)
    scores = jnp.einsum("Bd,Cd->BC", q, d, precision=_HI) * scale  # [B, B * (1 + n)]
    B = q.shape[0]
    positive = scores[jnp.arange(B), jnp.arange(B)]
    return -jnp.mean(positive - jax.nn.logsumexp(scores, axis=1))


def check_matryoshka(dims: Sequence[int], weights: Sequence[float] | None, out_features: int):
    """Validated (dims, weights), largest dimension first (sentence-transformers sorts them too)."""
    dims = tuple(int(d) for d in dims)
    if not dims:
        raise ValueError("matryoshka dims are empty; pass at least one dimension (e.g. 768,512,256,128)")
    weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(dims)))
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dims; give one weight per dimension")
    bad = [d for d in dims if not 0 < d <= out_features]
    if bad:
        raise ValueError(f"matryoshka dims {bad} are outside 1..{out_features} (the model's output size)")
    pairs = sorted(zip(dims, weights), key=lambda p: -p[0])
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def matryoshka_loss(queries: jax.Array, docs: jax.Array, dims: Sequence[int], weights: Sequence[float],
                    scale: float = 20.0) -> jax.Array:
    """Sum over dims of weight * MNRL on the first ``d`` components (each re-normalised)."""
    total = jnp.zeros((), jnp.float32)
    for d, w in zip(dims, weights):
        total = total + w * multiple_negatives_ranking_loss(queries[:, :d], docs[:, :d], scale)
    return total


def cosent_loss(a: jax.Array, b: jax.Array, labels: jax.Array, scale: float = 20.0) -> jax.Array:
    """sentence-transformers' ``CoSENTLoss``: ``log(1 + sum exp(scale * (cos(k, l) - cos(i, j))))`` over the
    pairs of pairs of the batch whose gold score has ``(i, j)`` above ``(k, l)``. ``a``, ``b`` [B, d]: the
    two sentences of each pair; ``labels`` [B]: their gold scores (any scale: only the order counts)."""
    s = jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1) * scale  # [B] scaled cosine
    labels = labels.astype(jnp.float32)
    diff = s[None, :] - s[:, None]  # [i, j] = s_j - s_i: pair i should score above pair j when label_i > label_j
    above = labels[:, None] > labels[None, :]
    terms = jnp.where(above, diff, -jnp.inf).reshape(-1)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), jnp.float32), terms]))


def matryoshka_cosent_loss(a: jax.Array, b: jax.Array, labels: jax.Array, dims: Sequence[int],
                           weights: Sequence[float], scale: float = 20.0) -> jax.Array:
    """``MatryoshkaLoss(CoSENTLoss)``: the sum over dims of weight * CoSENT on the first ``d`` components."""
    total = jnp.zeros((), jnp.float32)
    for d, w in zip(dims, weights):
        total = total + w * cosent_loss(a[:, :d], b[:, :d], labels, scale)
    return total
