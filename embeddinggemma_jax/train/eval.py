"""Retrieval evaluation on held-out pairs: each query against the corpus of all distinct positives.

Metrics per Matryoshka dimension (embeddings truncated to d, then re-normalised): recall@1,
recall@10, MRR@10 and nDCG@10 (one relevant document per query, so the ideal DCG is 1). Ties
count against the gold document (rank = number of documents scoring at least as high as it,
itself included), so a constant model cannot score well.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
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


class PairEvaluator:
    """Embeds a held-out pair file's queries and distinct positives with the training prompts."""

    def __init__(self, records, encoder, dims: Sequence[int], batch_size: int = 32, max_pairs: int | None = None):
        records = list(records)[:max_pairs] if max_pairs else list(records)
        self.queries = [r[0] for r in records]
        corpus: dict[str, int] = {}
        gold = []
        for r in records:
            gold.append(corpus.setdefault(r[1], len(corpus)))
        self.docs = list(corpus)
        self.gold = np.asarray(gold)
        self.encoder, self.dims, self.batch_size = encoder, tuple(dims), batch_size
        self.q_ids = encoder.ids(self.queries, encoder.query_prefix)
        self.d_ids = encoder.ids(self.docs, encoder.doc_prefix)

    def _embed(self, forward: Callable, ids) -> np.ndarray:
        out = None
        for b in self.encoder.planner(self.batch_size).batches(ids):
            e = np.asarray(forward(b.ids, b.mask), np.float32)[:len(b.index)]
            if out is None:
                out = np.zeros((len(ids), e.shape[-1]), np.float32)
            out[b.index] = e
        return out

    def evaluate(self, forward: Callable) -> dict:
        """``forward(ids, mask) -> [B, out]`` unnormalised; returns {dim: {metric: value}}."""
        return retrieval_metrics(self._embed(forward, self.q_ids), self._embed(forward, self.d_ids), self.gold,
                                 self.dims)


def format_metrics(m: dict) -> str:
    return "  ".join(f"d={d}: " + " ".join(f"{k}={v:.3f}" for k, v in vals.items()) for d, vals in m.items())


class MetricsLog:
    """Append-only JSONL: one object per logged step or evaluation.

    Local: flushed per line. Object store (``gs://``): an object cannot be appended to (and GCS allows
    about one update per second of one object), so the lines are kept in memory and the whole object is
    uploaded at ``flush`` (the run flushes at every checkpoint and at the end); the lines after the last
    checkpoint, which a kill loses, are the ones a resumed run writes again.
    """

    def __init__(self, path, enabled: bool = True):
        """``enabled=False`` (every process but the first of a multi-host run): writes nothing."""
        from embeddinggemma_jax.storage import epath, is_object_store

        self.path, self.enabled = epath(path), enabled
        self.remote = is_object_store(path)
        self._text: str | None = None  # object store: the whole file
        if enabled and not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _read(self) -> str:
        if self._text is None:
            self._text = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        return self._text

    def size(self) -> int:
        """Bytes written so far: a checkpoint records it, so a resume knows which lines are its own."""
        if not self.enabled:
            return 0
        if self.remote:
            return len(self._read().encode("utf-8"))
        return self.path.stat().length if self.path.is_file() else 0

    def truncate_after(self, step: int, size: int | None = None) -> None:
        """Drop the records of steps after ``step`` that this run wrote after its checkpoint: those past byte
        ``size`` (the file's size when the checkpoint was saved). Lines before it, a user's own included,
        are kept whatever their step; ``size`` None (a checkpoint from before it was recorded): every line."""
        from embeddinggemma_jax.io_utils import atomic_write_bytes

        if not self.enabled or not self.path.is_file():
            return
        data = self._read().encode("utf-8") if self.remote else self.path.read_bytes()
        cut = min(size or 0, len(data))
        head, tail = data[:cut], data[cut:].decode("utf-8").splitlines()
        kept = [x for x in tail if x.strip() and _step_of(x) <= step]
        if len(kept) != len(tail):
            text = head + "".join(x + "\n" for x in kept).encode("utf-8")
            if self.remote:
                self._text = text.decode("utf-8")
                self.flush()
            else:
                atomic_write_bytes(self.path, text)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        line = json.dumps(record) + "\n"
        if self.remote:
            self._text = self._read() + line
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def flush(self) -> None:
        """Object store: upload the whole file (one atomic object write); local: nothing to do."""
        if self.enabled and self.remote and self._text is not None:
            self.path.write_bytes(self._text.encode("utf-8"))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0
