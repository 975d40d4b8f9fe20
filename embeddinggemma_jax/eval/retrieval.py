"""Retrieval metrics: each query against the corpus of all distinct positives.

Metrics per Matryoshka dimension (embeddings truncated to d, then re-normalised): recall@1,
recall@10, MRR@10 and nDCG@10 (one relevant document per query, so the ideal DCG is 1). Ties
count against the gold document (rank = number of documents scoring at least as high as it,
itself included), so a constant model cannot score well.

``evaluate retrieval --data pairs.jsonl`` (``run_retrieval``), ``train --eval-file`` and
``benchmarks/quant_quality.py`` all compute them here.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from embeddinggemma_jax.head import l2_normalize

METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")


def gold_ranks(q: np.ndarray, docs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of each query's gold document; ties are broken against the gold document."""
    scores = q @ docs.T  # [n, m]
    g = scores[np.arange(len(q)), gold][:, None]
    higher_or_equal = (scores >= g).sum(axis=1)  # includes the gold document itself
    return higher_or_equal


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    top10 = ranks <= 10
    return {"recall@1": float(np.mean(ranks == 1)),
            "recall@10": float(np.mean(top10)),
            "mrr@10": float(np.mean(np.where(top10, 1.0 / ranks, 0.0))),
            "ndcg@10": float(np.mean(np.where(top10, 1.0 / np.log2(ranks + 1.0), 0.0)))}


def retrieval_metrics(q_raw: np.ndarray, d_raw: np.ndarray, gold: np.ndarray, dims: Sequence[int]) -> dict:
    """{dim: {metric: value}} from unnormalised query and document embeddings."""
    return {int(d): metrics_from_ranks(gold_ranks(l2_normalize(q_raw[:, :d]), l2_normalize(d_raw[:, :d]), gold))
            for d in dims}


def corpus_of(records) -> tuple[list[str], list[str], np.ndarray]:
    """(queries, distinct positives in first-seen order, index of each query's positive)."""
    corpus: dict[str, int] = {}
    gold = [corpus.setdefault(r[1], len(corpus)) for r in records]
    return [r[0] for r in records], list(corpus), np.asarray(gold, np.int64)


def format_metrics(m: dict) -> str:
    return "  ".join(f"d={d}: " + " ".join(f"{k}={v:.3f}" for k, v in vals.items()) for d, vals in m.items())


def run_retrieval(embed: Callable[[list[str], str | None], np.ndarray], records, dims: Sequence[int],
                  query_prompt: str | None = "query", document_prompt: str | None = "document") -> dict:
    """``embed(texts, prompt_name) -> [n, out]`` (unnormalised is fine) over held-out (query, positive)
    records: ``{"queries", "documents", "seconds", "by_dimension": {dim: {metric: value}}}``."""
    t0 = time.perf_counter()
    queries, docs, gold = corpus_of(records)
    q = embed(queries, query_prompt)
    d = embed(docs, document_prompt)
    m = retrieval_metrics(q, d, gold, dims)
    return {"queries": len(queries), "documents": len(docs), "seconds": time.perf_counter() - t0,
            "by_dimension": {str(k): v for k, v in m.items()}}
