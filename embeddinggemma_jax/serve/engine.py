"""The request queue and the one worker thread that runs the device step for every request.

Texts arrive already prompted and tokenised. Each text waits in its tier's queue under its length
bucket. The worker repeatedly builds one batch:

1. The *lead* text is the oldest waiting priority text; when none waits, the oldest default text.
   Anti-starvation: after ``STARVATION_STEPS`` batches in a row that left a waiting default text
   behind, the oldest default text leads the next batch. Under any priority load the default tier
   therefore gets at least one batch in ``STARVATION_STEPS + 1``.
2. The batch takes up to the lead bucket's row count of that bucket's waiting texts, priority
   first, each tier oldest first. While it has fewer texts than rows, the worker waits for more,
   but never past ``max_wait`` after the lead text arrived.
3. The package's batching engine (``EmbeddingGemma.planner``, with ``shrink="none"``: every batch has
   its bucket's full row count) pads them into the one shape of that bucket; the worker runs the
   model's step on it and hands every row to its request.

Why one fixed shape per bucket: on XLA:CPU a row's result does not change with what the other rows
hold, but it does change (in the last bits) with the batch's row count and padded length. With the
shape decided by a text's own length, a text gives the same bits whatever else is in the queue, and
the set of shapes is small and known in advance, so all of them are compiled before ``/ready``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from embeddinggemma_jax.batching import bucket_length
from embeddinggemma_jax.serve.schemas import TIERS

STARVATION_STEPS = 3


@dataclass(eq=False)
class Job:
    """One request's texts on their way through the queue."""

    token_ids: list[list[int]]
    tier: str
    on_done: Callable[["Job"], None]  # called on the worker thread once every row is filled (or failed)
    arrived: float = field(default_factory=time.monotonic)
    out: np.ndarray | None = None  # [n, out] fp32, the head's unnormalised output
    error: BaseException | None = None
    remaining: int = 0
    last_step: int = -1  # the number of the batch that finished this job

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


@dataclass(eq=False)
class _Item:
    job: Job
    row: int
    seq: int  # arrival order across both tiers


def _device_step(model) -> tuple[Callable, int]:
    """-> (batch -> [n, out] fp32, device count): ``embed_batch`` on one device; on several, the batch job's
    data-parallel step (parameters replicated, rows split over the devices)."""
    import jax

    n = jax.local_device_count()
    if n == 1:
        return model.embed_batch, 1
    from embeddinggemma_jax.batch.step import ShardedEncoder
    from embeddinggemma_jax.sharding import DATA_PARALLEL_RULES, make_mesh

    enc = ShardedEncoder(model, make_mesh((n, 1), jax.local_devices()), DATA_PARALLEL_RULES)

    def embed(batch):
        return enc.local_rows(enc(batch.ids, batch.mask))[:len(batch.index)]

    return embed, n


class QueueFull(Exception):
    def __init__(self, waiting: int):
        super().__init__(f"{waiting} texts are waiting")
        self.waiting = waiting


class BatchingWorker:
    """Owns the queues and the worker thread; ``submit`` may be called from any thread."""

    def __init__(self, model, *, batch_size: int, max_wait: float, max_queue: int, metrics=None,
                 step_gate: Callable[[], bool] | None = None):
        self.model = model
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.metrics = metrics
        self._step_gate = step_gate  # test hook: while it returns True, no batch is taken
        self._cond = threading.Condition()
        self._queues = {t: {L: deque() for L in model.length_buckets} for t in TIERS}
        self._waiting = {t: 0 for t in TIERS}
        self._waiting_tokens = 0
        self._busy = [0.0, 0]  # seconds in the device step, real tokens embedded there
        self._seq = 0
        self._passed_over = 0  # batches in a row that left a waiting default text behind
        self._stop = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="embeddinggemma-worker", daemon=True)
        self._embed, self.devices = _device_step(model)
        # One shape per bucket: the full row count only (no smaller tail batches), a multiple of the devices.
        self.planner = dataclasses.replace(model.planner(batch_size), shrink="none", row_multiple=self.devices)
        try:
            self.planner.shapes()
        except ValueError as e:
            raise ValueError(f"{e}; use a --batch-size that is a multiple of {self.devices} and --max-batch-tokens "
                             f"none (or large enough)") from None

    # ------------------------------------------------------------------ shapes
    def rows(self, length: int) -> int:
        """Rows of every batch of the ``length`` bucket."""
        return self.planner.full_rows(length)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) the worker can run: one per length bucket."""
        return self.planner.shapes()

    def warm(self, log: Callable[[str], None] = lambda s: None) -> float:
        """Compile (or load from the persistent cache) every shape; returns the seconds it took."""
        t0 = time.perf_counter()
        pad = self.model.tokenizer.pad_id
        for rows, L in self.shapes():
            t = time.perf_counter()
            (batch,) = self.planner.batches([[pad] * L])  # one full-length text, padded to this bucket's shape
            assert batch.ids.shape == (rows, L), (batch.ids.shape, rows, L)
            self._embed(batch)
            log(f"warmed {rows} x {L} in {time.perf_counter() - t:.2f} s")
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ queue
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def waiting(self, tier: str | None = None) -> int:
        with self._cond:
            return self._waiting[tier] if tier else sum(self._waiting.values())

    def waiting_tokens(self) -> int:
        with self._cond:
            return self._waiting_tokens

    def tokens_per_second(self) -> float | None:
        seconds, tokens = self._busy
        return tokens / seconds if seconds else None

    def submit(self, job: Job) -> None:
        """Queue a job's texts, or raise ``QueueFull`` when they would take the queue past ``max_queue``."""
        n = len(job.token_ids)
        job.remaining = n
        job.out = np.zeros((n, self.model.dimensions), np.float32)
        buckets = [bucket_length(len(t), self.model.length_buckets) for t in job.token_ids]
        with self._cond:
            total = sum(self._waiting.values())
            if total + n > self.max_queue:
                raise QueueFull(total)
            for row, L in enumerate(buckets):
                self._queues[job.tier][L].append(_Item(job, row, self._seq))
                self._seq += 1
            self._waiting[job.tier] += n
            self._waiting_tokens += job.tokens
            self._gauge(job.tier)
            self._cond.notify_all()

    def cancel(self, job: Job) -> int:
        """Take a job's texts still waiting out of the queue (its client went away): they never reach the
        device. Returns how many were dropped (texts already in a running batch finish there)."""
        with self._cond:
            dropped = 0
            for L, q in self._queues[job.tier].items():
                keep = deque(it for it in q if it.job is not job)
                for it in q:
                    if it.job is job:
                        dropped += 1
                        self._waiting_tokens -= len(job.token_ids[it.row])
                self._queues[job.tier][L] = keep
            self._waiting[job.tier] -= dropped
            job.remaining -= dropped
            self._gauge(job.tier)
            if self.metrics is not None and dropped:
                self.metrics.dropped.inc(dropped)
            self._cond.notify_all()
        return dropped

    def _gauge(self, tier: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(tier).set(self._waiting[tier])

    def _oldest(self, tier: str) -> _Item | None:
        heads = [q[0] for q in self._queues[tier].values() if q]
        return min(heads, key=lambda it: it.seq) if heads else None

    def _lead(self) -> _Item | None:
        prio, default = self._oldest("priority"), self._oldest("default")
        if default is not None and (prio is None or self._passed_over >= STARVATION_STEPS):
            return default
        return prio

    def _take(self, L: int, rows: int) -> list[_Item]:
        taken = []
        for tier in TIERS:  # priority first, each tier oldest first
            q = self._queues[tier][L]
            while q and len(taken) < rows:
                taken.append(q.popleft())
                self._waiting[tier] -= 1
                self._waiting_tokens -= len(taken[-1].job.token_ids[taken[-1].row])
            self._gauge(tier)
        return taken

    def _next_batch(self) -> list[_Item] | None:
        """Block until a batch is due (full, or its lead text waited ``max_wait``); None when stopping
        with nothing left."""
        with self._cond:
            while True:
                lead = self._lead()
                if lead is None:
                    if self._stop:
                        return None
                    self._cond.wait()
                    continue
                L = bucket_length(len(lead.job.token_ids[lead.row]), self.model.length_buckets)
                rows = self.rows(L)
                have = sum(len(self._queues[t][L]) for t in TIERS)
                wait = lead.job.arrived + self.max_wait - time.monotonic()
                if self._step_gate is not None and self._step_gate() and not self._stop:
                    self._cond.wait(0.005)
                    continue
                if have >= rows or wait <= 0 or self._stop:
                    taken = self._take(L, rows)
                    if self._waiting["default"] and not any(it.job.tier == "default" for it in taken):
                        self._passed_over += 1
                    else:
                        self._passed_over = 0
                    return taken
                self._cond.wait(wait)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            items = self._next_batch()
            if items is None:
                return
            self._step(items)

    def _step(self, items: Sequence[_Item]) -> None:
        ids = [it.job.token_ids[it.row] for it in items]
        step = self.steps
        self.steps += 1
        t0 = time.perf_counter()
        try:
            (batch,) = self.planner.batches(ids)  # texts of one bucket: exactly one batch
            out = self._embed(batch)
            self._busy = [self._busy[0] + time.perf_counter() - t0, self._busy[1] + batch.real_tokens]
            rows = np.empty_like(out)
            rows[batch.index] = out
        except BaseException as e:  # noqa: BLE001 - the requests fail, the worker keeps serving
            rows, error = None, e
        else:
            error = None
            if self.metrics is not None:
                self.metrics.batch_done(batch.real_tokens, batch.ids.size)
        done = []
        for i, it in enumerate(items):
            job = it.job
            if error is not None:
                job.error = error
            else:
                job.out[it.row] = rows[i]
            job.remaining -= 1
            if job.remaining == 0:
                job.last_step = step
                done.append(job)
        for job in done:
            job.on_done(job)
