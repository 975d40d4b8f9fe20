"""Evaluations during training: held-out pairs (retrieval) and STS files, embedded with the training
forward; the metrics themselves live in ``embeddinggemma_jax.eval`` (one home for every metric)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embeddinggemma_jax.eval.retrieval import (  # noqa: F401 - re-exported for train callers
    METRICS,
    corpus_of,
    format_metrics,
    gold_ranks,
    metrics_from_ranks,
    retrieval_metrics,
)


class PairEvaluator:
    """Embeds a held-out pair file's queries and distinct positives with the training prompts."""

    def __init__(self, records, encoder, dims: Sequence[int], batch_size: int = 32, max_pairs: int | None = None):
        records = list(records)[:max_pairs] if max_pairs else list(records)
        self.queries, self.docs, self.gold = corpus_of(records)
        self.encoder, self.dims, self.batch_size = encoder, tuple(dims), batch_size
        self.q_ids = encoder.ids(self.queries, encoder.query_prefix)
        self.d_ids = encoder.ids(self.docs, encoder.doc_prefix)

    def _embed(self, forward: Callable, ids) -> np.ndarray:
        return embed_ids(self.encoder, forward, ids, self.batch_size)

    def evaluate(self, forward: Callable) -> dict:
        """``forward(ids, mask) -> [B, out]`` unnormalised; returns {dim: {metric: value}}."""
        return retrieval_metrics(self._embed(forward, self.q_ids), self._embed(forward, self.d_ids), self.gold,
                                 self.dims)


def embed_ids(encoder, forward: Callable, ids, batch_size: int) -> np.ndarray:
    """Unnormalised [n, out] fp32 of token ids, in input order, through the batching engine's plan
    (``encoder.planner``) and the training forward ``forward(ids, mask)``."""
    out = None
    for b in encoder.planner(batch_size).batches(ids):
        e = np.asarray(forward(b.ids, b.mask), np.float32)[:len(b.index)]
        if out is None:
            out = np.zeros((len(ids), e.shape[-1]), np.float32)
        out[b.index] = e
    return out


class MetricsLog:
    """Append-only JSONL: one object per logged step or evaluation (flushed per line)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        """``enabled=False`` (every process but the first of a multi-host run): writes nothing."""
        self.path, self.enabled = Path(path), enabled
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written by a run that died before its next checkpoint)."""
        from embeddinggemma_jax.io_utils import atomic_write_bytes

        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
        if len(kept) != len(lines):
            atomic_write_bytes(self.path, "".join(x + "\n" for x in kept).encode())

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
