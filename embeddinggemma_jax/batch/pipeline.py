"""The embed job's run loop (``run_embed``) and its stages, each a function of the ``JobContext`` that
``context.setup`` builds once:

- ``tokenize_unit``: one unit's records -> prompt + tokenise; ``plan_round``: every host's records of the
  round -> global batches (``batching.BatchPlanner``), ``host_share``: this host's rows of each;
- ``step``: pad and run the batches through the sharded step (``batch.step``) -> raw embeddings;
- ``write``: the unit's shard (``shards``), atomically;
- ``summary.finalize``: totals over hosts, manifest.json and errors.jsonl (``manifest``).

``run_embed(options, stages=Stages(...))`` strings them together over this host's units (``my_units``:
unit ``(f, k)`` belongs to host ``(f + k) % processes``); ``Stages`` holds the real stages by default, and
a test or benchmark passes its own (a slower or a device-free step) instead of replacing module globals.
Counters live in a ``JobStats``.

Threads: a reader thread reads and tokenises the next unit (``read_ahead``) and a writer thread writes
shards while the main thread plans and runs the device step, so host work overlaps the device.

Multi-host rounds: every jitted call is a collective over all hosts, so the hosts work in rounds of one
unit each. A round's records (token ids, gathered from every host) are planned together into global
batches of P times a host's rows; host h computes rows h, h+P, ... of each batch (longest first, so every
host's share has the same row count and nearly the same lengths), and the rows' embeddings are gathered
back to the unit's host, which writes its shard. Every global batch is as full as one host's would be
with the round's records, whatever the host count; shrinking works since all hosts run the same plan.
Memory: one round (one unit per host) of token ids. A round in which some host has a shard left is
planned in full (done units are re-tokenised, not written), so a record meets the same batch shape as in
an uninterrupted run.

Determinism for resume: units, batches and shapes are pure functions of the input, so a rerun
(after a crash, ``kill -9``, preemption) skips done shards and rebuilds the rest bit for bit.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from embeddinggemma_jax.batch import shards
from embeddinggemma_jax.batch.context import EmbedOptions, JobContext, setup
from embeddinggemma_jax.batch.readers import Unit, input_sizes, iter_units
from embeddinggemma_jax.batch.summary import finalize
from embeddinggemma_jax.batching import PlannedBatch
from embeddinggemma_jax.errors import BadRecordError


@dataclass
class JobStats:
    """This host's (or, after ``totals``, all hosts') counters of one run."""

    records: int = 0
    bad: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    units_done: int = 0
    units_skipped: int = 0
    batches: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in sorted(self.__dataclass_fields__)}

    def totals(self) -> "JobStats":
        """Summed over all hosts (split in 30-bit halves: int32 collectives)."""
        from embeddinggemma_jax.distributed import allgather_ints

        d = self.as_dict()
        if _process_count() == 1:
            return JobStats(**d)
        g = allgather_ints([x for k in d for x in divmod(d[k], 1 << 30)]).astype(np.int64).sum(0)
        return JobStats(**{k: int(g[2 * i]) * (1 << 30) + int(g[2 * i + 1]) for i, k in enumerate(d)})


def _process_count() -> int:
    import jax

    return jax.process_count()


@dataclass
class Round:
    """One unit per host, planned together (``plan_round``)."""

    unit: Unit | None  # this host's unit (None: this host has no unit left)
    write: bool  # this host's shard is not done yet
    tokens: list  # every host's records of the round, host after host
    starts: list[int]  # host h's records are tokens[starts[h]:starts[h + 1]]
    plan: list[PlannedBatch]  # the global batches; host h computes host_share(b, h, processes)


def tokenize_unit(ctx: JobContext, u: Unit) -> list:
    """A unit's records with the prompt applied, tokenised (truncated to the model's limit); a bad record
    with ``--on-bad-record fail`` is a BadRecordError naming its file and line."""
    if u.bad and ctx.options.on_bad_record == "fail":
        b = u.bad[0]
        raise BadRecordError(f"{u.path}:{b.line}: {b.error}; fix the record or pass --on-bad-record skip")
    from embeddinggemma_jax.prompts import document_prefix

    texts = [(document_prefix(r.title or None) if ctx.options.title_field else ctx.prompt) + r.text
             for r in u.records]
    return ctx.model.tokenizer.encode(texts, truncate=True) if texts else []


def plan_round(ctx: JobContext, unit: Unit | None, write: bool, tokens: list) -> Round:
    """Gather every host's records of this round (host after host) and plan them together: every host
    computes the same global batches, each ``processes`` times a host's rows."""
    from embeddinggemma_jax.distributed import allgather_ragged

    if ctx.processes == 1:
        every = list(tokens)
        starts = [0, len(every)]
    else:
        lens = allgather_ragged([len(t) for t in tokens])
        flat = allgather_ragged(np.concatenate([np.asarray(t, np.int32) for t in tokens]) if tokens else [])
        every, starts = [], [0]
        for h_lens, h_flat in zip(lens, flat):
            cut = np.cumsum(np.concatenate([[0], h_lens]))
            every += [h_flat[cut[i]:cut[i + 1]] for i in range(len(h_lens))]
            starts.append(len(every))
    return Round(unit, write, every, starts, ctx.planner.plan([len(t) for t in every]))


def host_share(b: PlannedBatch, host: int, processes: int) -> np.ndarray:
    """The records of a global batch that ``host`` computes: every ``processes``-th row of the batch,
    longest first, so each host's share has the same row count and nearly the same lengths."""
    return b.index[host::processes]


def step(ctx: JobContext, rnd: Round, stats: JobStats) -> np.ndarray | None:
    """Pad this host's share of every batch of the round, run the sharded step, and collect the raw
    embeddings [records, model dims] of this host's unit (None when its shard is already done)."""
    from embeddinggemma_jax.distributed import allgather_rows
    from embeddinggemma_jax.batching import pad_rows

    P, me = ctx.processes, ctx.process_index
    pending = []
    for b in rnd.plan:
        ids, mask = pad_rows(rnd.tokens, host_share(b, me, P), (b.rows // P, b.length), ctx.planner.pad_id)
        pending.append((b, ctx.encoder(ids, mask)))
        stats.batches += 1
        stats.padded_tokens += ids.size
    lo, hi = rnd.starts[me], rnd.starts[me + 1]
    raw = np.zeros((hi - lo, ctx.model.dimensions), np.float32) if rnd.write else None
    for b, y in pending:
        local = ctx.encoder.local_rows(y)
        parts = local[None] if P == 1 else allgather_rows(local)  # [hosts, rows per host, dims]
        if raw is None:
            continue
        for g in range(P):
            idx = host_share(b, g, P)
            sel = (idx >= lo) & (idx < hi)
            raw[idx[sel] - lo] = parts[g, :len(idx)][sel]
    return raw


def unit_padded_tokens(rnd: Round, host: int) -> int:
    """The padded tokens a unit is charged: a row per record at its batch's length, and a batch's empty rows
    to the unit of its first (longest) record; over all units this sums to the round's padded tokens."""
    lo, hi = rnd.starts[host], rnd.starts[host + 1]
    n = 0
    for b in rnd.plan:
        n += int(((b.index >= lo) & (b.index < hi)).sum()) * b.length
        if lo <= b.index[0] < hi:
            n += (b.rows - len(b.index)) * b.length
    return n


def write(ctx: JobContext, rnd: Round, raw: np.ndarray, stats: JobStats) -> None:
    """Truncate/normalise to the requested dimensions and write this host's unit's shard atomically."""
    from embeddinggemma_jax.head import apply_dimensions

    u, me = rnd.unit, ctx.process_index
    lens = [len(t) for t in rnd.tokens[rnd.starts[me]:rnd.starts[me + 1]]]
    emb = apply_dimensions(raw, ctx.dims, True).astype(np.float32)
    meta = {"file": u.path, "file_index": u.file_index, "unit": u.unit_index, "first_line": u.first_line,
            "last_line": u.last_line, "blank": u.blank, "tokens": int(sum(lens)),
            "padded_tokens": unit_padded_tokens(rnd, me), "input_sha256": u.sha256,
            "bad": [b.to_json(u.path) for b in u.bad]}
    shards.write_shard(ctx.out, u.name, emb, [r.id for r in u.records], meta)
    stats.records += len(lens)
    stats.bad += len(u.bad)
    stats.tokens += int(sum(lens))
    stats.units_done += 1


class _Progress:
    """Process 0's progress bar over input bytes (a no-op elsewhere or with --no-progress)."""

    def __init__(self, ctx: JobContext, stats: JobStats):
        self.stats, self.t0, self.bar = stats, time.perf_counter(), None
        self.total = sum(input_sizes(ctx.spec.paths))
        if ctx.process_index == 0 and ctx.options.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc="embed", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def tick(self, u: Unit | None) -> None:
        if self.bar is None or u is None:
            return
        self.bar.n = u.bytes_done
        dt = max(1e-9, time.perf_counter() - self.t0)
        s = self.stats
        self.bar.set_postfix_str(f"{s.records / dt:,.0f} rec/s, {s.tokens / dt:,.0f} tok/s, {s.units_done} shards",
                                 refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.total
            self.bar.close()
            self.bar = None


def my_units(ctx: JobContext, unit_names: list[str]):
    """This host's units in input order (unit ``(f, k)`` belongs to host ``(f + k) % processes``); every
    unit's name, this host's or not, is appended to ``unit_names`` (process 0 lists them in the manifest)."""
    for u in iter_units(ctx.spec, lambda f, k: (f + k) % ctx.processes == ctx.process_index):
        unit_names.append(u.name)
        if u.selected:
            yield u


@dataclass
class _Ahead:
    """A unit read and tokenised ahead by the reader thread (``tokens`` None: its shard is done)."""

    unit: Unit | None
    done: bool
    tokens: list | None = None
    error: str | None = None


def read_ahead(ctx: JobContext, units, tokenize=tokenize_unit) -> _Ahead:
    """The reader thread's work for one unit: read it, check its shard, tokenise it when not done."""
    u = next(units, None)
    if u is None:
        return _Ahead(None, True, [])
    meta = shards.read_meta(ctx.out, u.name)
    if shards.check_shard(ctx.out, u.name, meta) is None:
        if meta.get("input_sha256") == u.sha256:
            return _Ahead(u, True)
        # The shard was made from other input (the file was rewritten since): redo it, never keep it.
        print(f"embed: {u.path} lines {u.first_line}-{u.last_line} changed since shard {u.name} was written "
              f"(input fingerprint differs); redoing that shard", file=sys.stderr)
    try:
        return _Ahead(u, False, tokenize(ctx, u))
    except BadRecordError as e:
        return _Ahead(u, False, error=str(e))




@dataclass(frozen=True)
class Stages:
    """The stages ``run_embed`` runs: the real ones by default; a test or benchmark passes its own (e.g. a
    step made slower, or one that never touches a device) with the same signatures."""

    setup: Callable[[EmbedOptions], JobContext] = setup
    tokenize: Callable[[JobContext, Unit], list] = tokenize_unit
    step: Callable[[JobContext, Round, JobStats], np.ndarray | None] = step
    write: Callable[[JobContext, Round, np.ndarray, JobStats], None] = write


def run_embed(o: EmbedOptions, stages: Stages = Stages()) -> dict:
    """setup -> per round (one unit per host): tokenise -> plan -> step -> write -> finalize.

    Host work overlaps the device step: a reader thread reads and tokenises the next unit while the
    current round runs, and a writer thread writes finished shards (at most two pending). ``stages``: the
    real stages unless a test or benchmark passes others."""
    from concurrent.futures import ThreadPoolExecutor

    from embeddinggemma_jax.distributed import allgather_ints
    from embeddinggemma_jax.train.monitor import ProfileWindow, parse_window

    ctx = stages.setup(o)
    stats = JobStats()
    progress = _Progress(ctx, stats)
    t_loop = time.perf_counter()
    unit_names: list[str] = []
    mine = my_units(ctx, unit_names)
    reader = ThreadPoolExecutor(1, thread_name_prefix="embed-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="embed-write")
    writes: list = []
    ahead = reader.submit(read_ahead, ctx, mine, stages.tokenize)
    profile = ProfileWindow(parse_window(o.profile_rounds, "--profile-rounds"), f"{str(o.output).rstrip('/')}/profile",
                            enabled=ctx.processes == 1 or ctx.process_index == 0)
    computed = 0  # rounds that ran the step, counted from 1 for --profile-rounds
    try:
        while True:
            nx = ahead.result() if ahead is not None else _Ahead(None, True, [])
            ahead = reader.submit(read_ahead, ctx, mine, stages.tokenize) if nx.unit is not None else None
            u, done = nx.unit, nx.done
            flags = allgather_ints([u is None, done])
            if flags[:, 0].all():
                break
            if flags[:, 1].all():  # nothing to do in this round on any host
                stats.units_skipped += u is not None
                progress.tick(u)
                continue
            computed += 1
            rnd, raw = _compute_round(ctx, stages, nx, stats, profile, computed)
            if rnd.write:
                writes.append(writer.submit(stages.write, ctx, rnd, raw, stats))
                while len(writes) > 2:
                    writes.pop(0).result()
            elif u is not None:
                stats.units_skipped += 1
            progress.tick(u)
        for f in writes:
            f.result()
        profile.stop()
    finally:
        progress.close()
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
    return finalize(ctx, stats, unit_names, time.perf_counter() - t_loop)


def _compute_round(ctx: JobContext, stages: Stages, nx: _Ahead, stats: JobStats, profile, computed: int):
    """A round some host must compute: every host tokenises its unit, done or not, so the round's plan (and
    every record's batch shape) is the one an uninterrupted run used; -> (the round, this unit's raw
    embeddings or None)."""
    import jax

    from embeddinggemma_jax.distributed import agree_error, allgather_ints

    u, done, tokens, error = nx.unit, nx.done, nx.tokens, nx.error
    if tokens is None and error is None:
        tokens = stages.tokenize(ctx, u)  # a done unit passed its bad-record check when it was written
    if error is not None and ctx.processes == 1:
        raise BadRecordError(error)
    if ctx.processes > 1 and allgather_ints([error is not None])[:, 0].any():
        raise BadRecordError(agree_error(error))  # every host stops with the same message
    rnd = plan_round(ctx, u, not done, tokens or [])
    profile.before(computed)
    with jax.profiler.StepTraceAnnotation("embed_round", step_num=computed):
        raw = stages.step(ctx, rnd, stats)
    profile.after(computed, raw)
    return rnd, raw


__all__ = ["JobStats", "Round", "Stages", "tokenize_unit", "plan_round", "host_share", "step", "unit_padded_tokens",
           "write", "my_units", "read_ahead", "run_embed"]
