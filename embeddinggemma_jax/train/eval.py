"""Evaluations during training: held-out pairs (retrieval) and STS files, embedded with the training
forward; the metrics themselves live in ``embeddinggemma_jax.eval`` (one home for every metric)."""

from __future__ import annotations

import json
import time
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


class StsEvaluator:
    """STS files (``eval.sts``) embedded with the training forward and the model's STS prompt; every file
    is read and checked when the run starts, before its first step."""

    def __init__(self, data, split: str, languages, encoder, prefix: str, dims: Sequence[int],
                 batch_size: int = 32, max_pairs: int | None = None):
        from embeddinggemma_jax.eval import sts

        self.pairs = {lang: sts.read_sts_file(p, lang).head(max_pairs)
                      for lang, p in sts.sts_files(data, split, languages).items()}
        self.encoder, self.prefix, self.dims, self.batch_size = encoder, prefix, tuple(dims), batch_size

    def evaluate(self, forward: Callable) -> dict:
        """``{"results": {lang: {"spearman", "by_dimension", ...}}, "mean", "mean_by_dimension"}``."""
        from embeddinggemma_jax.eval import sts

        def embed(texts):
            return embed_ids(self.encoder, forward, self.encoder.ids(texts, self.prefix), self.batch_size)

        return sts.evaluate_languages(embed, self.pairs, self.dims)


def best_value(metric: str, retrieval: dict | None, sts: dict | None) -> float | None:
    """The value of a ``--keep-best`` metric in one evaluation (higher is better): ``sts`` (mean Spearman x 100
    over the languages), ``sts:LANG``, or a retrieval metric (``ndcg@10``, ...) at the largest dimension."""
    if metric == "sts":
        return None if sts is None else sts["mean"]
    if metric.startswith("sts:"):
        return None if sts is None else sts["results"][metric[4:]]["spearman"]
    return None if retrieval is None else retrieval[max(retrieval)][metric]


def check_best_metric(metric: str, retrieval: bool, sts_languages: Sequence[str] | None) -> None:
    """One line when ``--keep-best`` names a metric no evaluation of the run computes."""
    if metric == "sts" or metric.startswith("sts:"):
        if sts_languages is None:
            raise ValueError(f"--keep-best {metric} needs --eval-sts DIR")
        if metric.startswith("sts:") and metric[4:] not in sts_languages:
            raise ValueError(f"--keep-best {metric}: language {metric[4:]!r} is not evaluated "
                             f"(--eval-languages gives: {', '.join(sts_languages)})")
    elif metric in METRICS:
        if not retrieval:
            raise ValueError(f"--keep-best {metric} needs --eval-file PAIRS.jsonl")
    else:
        raise ValueError(f"--keep-best {metric!r} is unknown; use sts, sts:LANG or one of {', '.join(METRICS)}")


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
