"""The resumable, multi-host embedding job and its verifier.

Named stages, each a function of the ``JobContext`` that ``setup`` builds once:

- ``setup``: validate options, start the processes, load the model, build the planner and the sharded
  step, claim the output folder (job.json);
- ``tokenize_unit``: one unit's records -> prompt + tokenise; ``plan_round``: every host's records of the
  round -> global batches (``batching.BatchPlanner``), ``host_share``: this host's rows of each;
- ``step``: pad and run the batches through the sharded step (``batch.step``) -> raw embeddings;
- ``write``: the unit's shard (``shards``), atomically;
- ``finalize``: totals over hosts, manifest.json and errors.jsonl.

Threads: a reader thread reads and tokenises the next unit (``read_ahead``) and a writer thread writes
shards while the main thread plans and runs the device step, so host work overlaps the device.

``run_embed`` strings them together over this host's units (``my_units``: unit ``(f, k)`` belongs to
host ``(f + k) % processes``); counters live in a ``JobStats``.

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

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from embeddinggemma_jax.batch import shards
from embeddinggemma_jax.distributed import Distributed
from embeddinggemma_jax.batch.readers import (
    FORMATS,
    InputSpec,
    Unit,
    expand_inputs,
    infer_format,
    input_sizes,
    iter_units,
    unit_name,
)
from embeddinggemma_jax.batching import (
    JOB_LENGTH_BUCKETS,
    BatchPlanner,
    PlannedBatch,
    buckets_for,
    padding_efficiency,
)
from embeddinggemma_jax.errors import BadRecordError, JobError, VerifyError
from embeddinggemma_jax.hub import DEFAULT_MODEL
from embeddinggemma_jax.options import ints, option
from embeddinggemma_jax.quant import MODE_NAMES
from embeddinggemma_jax.topologies import TOPOLOGIES, rows_table

MANIFEST = "manifest.json"
JOB = "job.json"
ERRORS = "errors.jsonl"
FORMAT_VERSION = 2  # 2: every shard records its input's fingerprint (input_sha256)




def _mesh(s: str) -> tuple[int, int]:
    try:
        d, f = (int(x) for x in s.split(","))
    except ValueError:
        raise ValueError(f"--mesh takes DATA,FSDP (e.g. 4,2), got {s!r}") from None
    return d, f


def _buckets(s: str) -> tuple[int, ...]:
    out = tuple(sorted(ints(s)))
    if not out or out[0] < 1:
        raise ValueError(f"--buckets takes positive comma-separated lengths (e.g. 64,128,256), got {s!r}")
    return out


@dataclass(frozen=True)
class EmbedOptions:
    """An ``embed`` job; every field is a flag (``options``) and is recorded in the job's job.json."""

    inputs: tuple[str, ...] = option(None, "input files, local or gs:// (globs allowed)", flag="--input", nargs="+",
                                     metavar="PATH", required=True)
    output: str | None = option(None, "output folder (shared by all hosts; not needed with --plan-only)", metavar="DIR")
    model: str = option(DEFAULT_MODEL, "model folder, Orbax checkpoint or hub id")
    format: str | None = option(None, "input format (default: from the file extension)", choices=list(FORMATS))
    text_field: str = option("text", "jsonl/parquet field with the text")
    id_field: str | None = option(None, "jsonl/parquet field with the record id (default: FILE:LINE)")
    title_field: str | None = option(None, "field with a title for the document prompt 'title: T | text: ...'")
    prompt_name: str | None = option("document", "model prompt to prepend ('' for none)")
    dimensions: int | None = option(None, "Matryoshka size (768 full, 512, 256, 128)")
    dtype: str | None = option(None, "compute dtype (default: the topology's, bfloat16; else float32)",
                               choices=["float32", "bfloat16"])
    quantize: str | None = option(None, "post-training quantization of the weights (default: none)",
                                  choices=list(MODE_NAMES))
    topology: str | None = option(None, "TPU slice config from tpu/configs (mesh, dtype, rows per bucket)",
                                  choices=sorted(TOPOLOGIES, key=lambda n: int(n.split("-")[1])))
    mesh: tuple[int, int] | None = option(None, "DATA,FSDP mesh shape (default: all devices on data)", parse=_mesh)
    tokens_per_device: int | None = option(None, "token budget per device per batch (overrides the topology)")
    unit_size: int = option(16384, "input lines (parquet: rows) per work unit = per output shard")
    buckets: tuple[int, ...] | None = option(None, "padded lengths, comma-separated (default: the topology's)",
                                             parse=_buckets)
    shrink: bool = option(True, "shrink a sparse bucket's last batch (more compiled shapes, less padding)")
    on_bad_record: str = option("fail", "fail names the file and line; skip writes it to errors.jsonl",
                                choices=["fail", "skip"])
    progress: bool = option(True, "show a progress bar")
    distributed: Distributed = field(default_factory=Distributed)
    plan_only: bool = option(False, "read, tokenise and plan the input, print the cost (batches, shapes, padding "
                                    "efficiency); loads no weights, compiles nothing, writes nothing")
    simulate_hosts: int | None = option(None, "with --plan-only: plan as this many hosts would (default: the "
                                              "topology's hosts, else 1)")

    profile_rounds: str | None = option(None, "A:B: trace computed rounds A..B with jax.profiler into OUTPUT/profile "
                                              "(TensorBoard's profile plugin, XProf)", metavar="A:B")

    def __post_init__(self):
        from embeddinggemma_jax.train.monitor import parse_window

        parse_window(self.profile_rounds, "--profile-rounds")
        if self.prompt_name == "":
            object.__setattr__(self, "prompt_name", None)
        if self.inputs is not None and not isinstance(self.inputs, tuple):
            object.__setattr__(self, "inputs", tuple(self.inputs))


def model_hash(folder) -> str:
    """sha256 over every file of the model folder (relative name and content hash)."""
    from pathlib import Path

    from embeddinggemma_jax.hub import sha256_file

    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


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
class JobContext:
    """Everything ``setup`` decides once per run; the later stages only read it."""

    options: EmbedOptions
    processes: int
    process_index: int
    spec: InputSpec
    model: object
    encoder: object  # step.ShardedEncoder
    planner: BatchPlanner
    buckets: tuple[int, ...]
    local_rows: dict[int, int]
    prompt: str
    dims: int
    mesh_shape: tuple[int, int]
    out: object  # epath of the output folder
    job: dict
    t_start: float


@dataclass
class Round:
    """One unit per host, planned together (``plan_round``)."""

    unit: Unit | None  # this host's unit (None: this host has no unit left)
    write: bool  # this host's shard is not done yet
    tokens: list  # every host's records of the round, host after host
    starts: list[int]  # host h's records are tokens[starts[h]:starts[h + 1]]
    plan: list[PlannedBatch]  # the global batches; host h computes host_share(b, h, processes)


def setup(o: EmbedOptions) -> JobContext:
    """Validate the options, start the processes, load the model, build the planner and the sharded step,
    and claim (or check, when resuming) the output folder's job.json."""
    if o.on_bad_record not in ("fail", "skip"):
        raise JobError(f"--on-bad-record must be fail or skip, got {o.on_bad_record!r}")
    if o.unit_size < 1:
        raise JobError(f"--unit-size must be >= 1, got {o.unit_size}")
    if not o.inputs:
        raise JobError("no --input given; pass one or more files")
    if not o.output:
        raise JobError("no --output given; pass the output folder (or --plan-only to only plan the job)")
    o.distributed.start()
    import jax

    from embeddinggemma_jax import EmbeddingGemma, topologies
    from embeddinggemma_jax.batch.step import ShardedEncoder
    from embeddinggemma_jax.head import check_dimensions
    from embeddinggemma_jax.sharding import DATA_PARALLEL_RULES, make_mesh, num_slices

    P, me = jax.process_count(), jax.process_index()
    topo = topologies.get(o.topology) if o.topology else None
    slices = num_slices()  # a multi-slice job runs the topology on every slice, data parallel over them
    if topo is not None and jax.device_count() != topo.chips * slices:
        raise JobError(f"topology {topo.name} has {topo.chips} chips but JAX sees {jax.device_count()} devices "
                       f"on {slices} slice(s); run on that slice (with --multihost on every worker) or pick the "
                       f"matching --topology")
    dtype = o.dtype or (topo.dtype if topo else "float32")
    mesh_shape = tuple(o.mesh) if o.mesh else \
        ((topo.mesh_shape[0] * slices, topo.mesh_shape[1]) if topo else (jax.device_count(), 1))
    rules = topo.rules_table if topo else DATA_PARALLEL_RULES
    inputs = expand_inputs(o.inputs)
    fmt = o.format or infer_format(inputs)
    spec = InputSpec(tuple(inputs), fmt, o.text_field, o.id_field, o.title_field, o.unit_size)
    input_sizes(spec.paths)  # fail early on a missing input
    check_output_folder(o.output)

    t_start = time.perf_counter()
    if o.quantize in ("mixed", "int4-weights"):  # XLA rejects the int4 arrays' layout in the pre-compiled steps
        raise JobError(f"--quantize {o.quantize} holds int4 weights, which XLA cannot lay out in the embed job's "
                       "pre-compiled sharded steps (an XLA limit on int4 arrays); "
                       "use --quantize int8-weights or int8 here (encode and serve take every mode)")
    model = EmbeddingGemma.from_pretrained(o.model, dtype=dtype, quantize=o.quantize)
    dims = check_dimensions(o.dimensions, model.dimensions)
    if o.title_field and o.prompt_name != "document":
        raise JobError("--title-field builds the document prompt; use it with --prompt-name document")
    prompt = ""
    if o.prompt_name:
        if o.prompt_name not in model.prompts:
            raise JobError(f"unknown --prompt-name {o.prompt_name!r}; the model has: {', '.join(sorted(model.prompts))}")
        prompt = model.prompts[o.prompt_name]
    buckets = buckets_for(model.head_config.max_seq_length, o.buckets or (topo.buckets if topo else JOB_LENGTH_BUCKETS))
    mesh = make_mesh(mesh_shape)
    enc = ShardedEncoder(model, mesh, rules)
    per_dev = rows_table(topo, buckets, o.tokens_per_device)
    local_rows = {L: r * enc.local_split for L, r in per_dev.items()}
    # One planner for the round's global batches: every host runs the same plan, each with 1/P of a batch's rows.
    planner = BatchPlanner(buckets, {L: r * P for L, r in local_rows.items()}, model.tokenizer.pad_id,
                           shrink="fine" if o.shrink else "none", row_multiple=enc.local_split * P)

    options = dict(spec.options(), prompt_name=o.prompt_name, prompt=prompt, dimensions=dims, dtype=dtype,
                   quantize=o.quantize,
                   topology=o.topology, mesh=list(mesh_shape), rows_per_device={str(k): v for k, v in per_dev.items()},
                   buckets=list(buckets), shrink=o.shrink, on_bad_record=o.on_bad_record, format_version=FORMAT_VERSION)
    model_info = {"source": str(model.source), "sha256": model_hash(model.source)}
    job = {"options": options, "model": model_info}
    out = shards.epath(o.output)
    _claim_output(out, o.output, job, me)
    return JobContext(o, P, me, spec, model, enc, planner, buckets, local_rows, prompt, dims, mesh_shape, out, job,
                      t_start)


def check_output_folder(output: str) -> None:
    """Refuse, before anything is written, an existing --output that is not an embed job folder: a
    non-empty folder without job.json (leftover temporaries of an atomic write do not count)."""
    out = shards.epath(output)
    if not out.exists():
        return
    if not out.is_dir():
        raise JobError(f"--output {output} is a file, not a folder; pass a new or empty folder")
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(shards.TMP_PREFIX))
    if names and JOB not in names:
        raise JobError(f"--output {output} is not empty ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
                       f"and holds no {JOB}, so it is not an embed job folder; refusing to write into it: pass a "
                       f"new or empty folder")


def _claim_output(out, name: str, job: dict, me: int) -> None:
    from embeddinggemma_jax.distributed import barrier

    options = job["options"]
    if me == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier("embed-mkdir")
    job_path = out / JOB
    if job_path.exists():
        old = json.loads(job_path.read_text())
        if old != job:
            diff = sorted(k for k in set(old.get("options", {})) | set(options)
                          if old.get("options", {}).get(k) != options.get(k))
            if old.get("model") != job["model"]:
                diff.append("model")
            raise JobError(f"{name} holds a run with different settings ({', '.join(diff)}); rerun with the "
                           f"same command to resume, or use a new --output")
    barrier("embed-job-checked")
    if me == 0:
        shards.remove_temporaries(out)
        if not job_path.exists():
            shards.write_atomic(job_path, (json.dumps(job, indent=1) + "\n").encode())
        (out / shards.SHARDS).mkdir(parents=True, exist_ok=True)
    barrier("embed-start")


def tokenize_unit(ctx: JobContext, u: Unit) -> list:
    """A unit's records with the prompt applied, tokenised (truncated to the model's limit); a bad record
    with ``--on-bad-record fail`` is a BadRecordError naming its file and line."""
    if u.bad and ctx.options.on_bad_record == "fail":
        b = u.bad[0]
        raise BadRecordError(f"{u.path}:{b.line}: {b.error}; fix the record or pass --on-bad-record skip")
    from embeddinggemma_jax.model import DOCUMENT_TEMPLATE

    texts = [(DOCUMENT_TEMPLATE.format(title=r.title or "none") if ctx.options.title_field else ctx.prompt) + r.text
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


def finalize(ctx: JobContext, stats: JobStats, unit_names: list[str], wall: float) -> dict:
    """Sum the hosts' counters, write manifest.json and errors.jsonl (process 0), and return the summary."""
    import jax

    from embeddinggemma_jax.distributed import barrier

    total = stats.totals().as_dict()
    compile_seconds = ctx.encoder.compile_seconds
    if ctx.processes > 1:  # the slowest host's: the others wait for it in the next collective
        from embeddinggemma_jax.distributed import allgather_ints

        compile_seconds = int(allgather_ints([round(compile_seconds * 1000)])[:, 0].max()) / 1000
    barrier("embed-shards-written")
    manifest = write_manifest(ctx.out, unit_names, ctx.job) if ctx.process_index == 0 else None
    barrier("embed-manifest")
    summary = dict(total, wall_seconds=round(wall, 3), total_seconds=round(time.perf_counter() - ctx.t_start, 3),
                   compile_seconds=round(compile_seconds, 3), compiled_shapes=ctx.encoder.num_shapes,
                   processes=ctx.processes, devices=jax.device_count(), mesh=list(ctx.mesh_shape),
                   records_per_second=round(total["records"] / max(wall, 1e-9), 2),
                   tokens_per_second=round(total["tokens"] / max(wall, 1e-9), 2),
                   padding_efficiency_this_run=round(padding_efficiency(total["tokens"], total["padded_tokens"]), 4)
                   if total["padded_tokens"] else None)
    if manifest is not None:
        summary["manifest_counts"] = manifest["counts"]
    return summary


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


def read_ahead(ctx: JobContext, units) -> _Ahead:
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
        return _Ahead(u, False, tokenize_unit(ctx, u))
    except BadRecordError as e:
        return _Ahead(u, False, error=str(e))


def run_embed(o: EmbedOptions) -> dict:
    """setup -> per round (one unit per host): tokenise -> plan -> step -> write -> finalize.

    Host work overlaps the device step: a reader thread reads and tokenises the next unit while the
    current round runs, and a writer thread writes finished shards (at most two pending)."""
    from concurrent.futures import ThreadPoolExecutor

    import jax

    from embeddinggemma_jax.distributed import agree_error, allgather_ints

    ctx = setup(o)
    P = ctx.processes
    stats = JobStats()
    progress = _Progress(ctx, stats)
    t_loop = time.perf_counter()
    unit_names: list[str] = []
    mine = my_units(ctx, unit_names)
    reader = ThreadPoolExecutor(1, thread_name_prefix="embed-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="embed-write")
    writes: list = []
    ahead = reader.submit(read_ahead, ctx, mine)
    from embeddinggemma_jax.train.monitor import ProfileWindow, parse_window

    profile = ProfileWindow(parse_window(o.profile_rounds, "--profile-rounds"), f"{str(o.output).rstrip('/')}/profile",
                            enabled=P == 1 or ctx.process_index == 0)
    computed = 0  # rounds that ran the step, counted from 1 for --profile-rounds
    try:
        while True:
            nx = ahead.result() if ahead is not None else _Ahead(None, True, [])
            ahead = reader.submit(read_ahead, ctx, mine) if nx.unit is not None else None
            u, done = nx.unit, nx.done
            flags = allgather_ints([u is None, done])
            if flags[:, 0].all():
                break
            if flags[:, 1].all():  # nothing to do in this round on any host
                stats.units_skipped += u is not None
                progress.tick(u)
                continue
            # Some host must compute this round: every host tokenises its unit, done or not, so the round's
            # plan (and every record's batch shape) is the one an uninterrupted run used.
            tokens, error = nx.tokens, nx.error
            if tokens is None and error is None:
                tokens = tokenize_unit(ctx, u)  # a done unit passed its bad-record check when it was written
            if error is not None and P == 1:
                raise BadRecordError(error)
            if P > 1 and allgather_ints([error is not None])[:, 0].any():
                raise BadRecordError(agree_error(error))  # every host stops with the same message
            rnd = plan_round(ctx, u, not done, tokens or [])
            computed += 1
            profile.before(computed)
            with jax.profiler.StepTraceAnnotation("embed_round", step_num=computed):
                raw = step(ctx, rnd, stats)
            profile.after(computed, raw)
            if rnd.write:
                writes.append(writer.submit(write, ctx, rnd, raw, stats))
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


def _id_key(x) -> str:
    """Ids compare as text: ``"1"`` and ``1`` name the same record for whoever joins on them."""
    return str(x) if isinstance(x, (str, int)) else json.dumps(x, sort_keys=True)


def find_duplicates(records) -> list[dict]:
    """``records``: (id, file, line) in input order. Every record whose id an earlier record already
    has, as ``{"id", "first": {"file", "line"}, "again": {"file", "line"}}``: both are kept (docs/batch-job.md)."""
    first: dict[str, tuple[str, int]] = {}
    out = []
    for rid, path, line in records:
        k = _id_key(rid)
        if k in first:
            f, ln = first[k]
            out.append({"id": rid, "first": {"file": f, "line": ln}, "again": {"file": path, "line": line}})
        else:
            first[k] = (path, line)
    return out


def _shard_duplicates(out, unit_names: list[str], options: dict) -> list[dict]:
    """Duplicate ids over the finished shards; the line numbers of the (few) units involved are read back
    from the input (ids files hold no lines)."""
    owner: dict[str, tuple[str, int]] = {}
    hits = []  # (id, (unit, position) first, (unit, position) again)
    for name in unit_names:
        _, ids = shards.load_shard(out, name)
        for i, rid in enumerate(ids):
            k = _id_key(rid)
            if k in owner:
                hits.append((rid, owner[k], (name, i)))
            else:
                owner[k] = (name, i)
    if not hits:
        return []
    involved = {n for _, a, b in hits for n in (a[0], b[0])}
    spec = InputSpec(tuple(options["inputs"]), options["format"], options["text_field"], options["id_field"],
                     options["title_field"], options["unit_size"])
    where = {}
    for u in iter_units(spec, lambda f, k: unit_name(f, k) in involved):
        if u.selected:
            where[u.name] = [(u.path, r.line) for r in u.records]

    def at(ref):
        path, line = where[ref[0]][ref[1]]
        return {"file": path, "line": line}

    return [{"id": rid, "first": at(a), "again": at(b)} for rid, a, b in hits]


def write_manifest(out, unit_names: list[str], job: dict) -> dict:
    """Collect every shard's metadata (all hosts'), write errors.jsonl and manifest.json."""
    metas, errors = [], []
    for name in unit_names:
        meta = shards.read_meta(out, name)
        problem = shards.check_shard(out, name, meta)
        if problem:
            raise JobError(f"shard {name}: {problem}; a host may have failed: rerun the same command to finish")
        metas.append(meta)
        errors += meta["bad"]
    shards.write_atomic(out / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode())
    tokens = sum(m["tokens"] for m in metas)
    padded = sum(m["padded_tokens"] for m in metas)
    dups = _shard_duplicates(out, unit_names, job["options"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "options": job["options"],
        "model": job["model"],
        "counts": {"records": sum(m["records"] for m in metas), "bad_records": len(errors),
                   "blank_lines": sum(m["blank"] for m in metas), "shards": len(metas),
                   "tokens": tokens, "padded_tokens": padded,
                   "padding_efficiency": round(padding_efficiency(tokens, padded), 6),
                   "duplicate_ids": len(dups)},
        "duplicate_ids": dups,
        "shards": [{k: m[k] for k in ("name", "file", "first_line", "last_line", "records", "input_sha256", "sha256")}
                   for m in metas],
    }
    shards.write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def format_summary(s: dict) -> str:
    eff = s.get("manifest_counts", {}).get("padding_efficiency")
    lines = [
        f"embedded {s['records']:,} records ({s['tokens']:,} tokens) in {s['units_done']} shards; "
        f"{s['units_skipped']} shards already done (resumed); {s['bad']} bad records",
        f"throughput: {s['records_per_second']:,.1f} records/s, {s['tokens_per_second']:,.0f} tokens/s "
        f"over {s['wall_seconds']:.1f} s on {s['devices']} devices ({s['processes']} processes, mesh {s['mesh']})",
        f"padding efficiency: {s['padding_efficiency_this_run'] or 1.0:.3f} this run"
        + (f", {eff:.3f} over the whole output" if eff is not None else ""),
        f"compile time: {s['compile_seconds']:.1f} s for {s['compiled_shapes']} batch shapes; "
        f"total {s['total_seconds']:.1f} s",
    ]
    dups = s.get("manifest_counts", {}).get("duplicate_ids")
    if dups:
        lines.append(f"warning: {dups:,} records repeat an earlier record's id (both kept); manifest.json "
                     f"duplicate_ids lists each with both file:line")
    return "\n".join(lines)


def _read_manifest(mp, out_dir: str) -> tuple[dict, dict]:
    """manifest.json and its options, or a one-line VerifyError for a truncated or malformed file."""
    from embeddinggemma_jax.errors import FileFormatError
    from embeddinggemma_jax.io_utils import parse_json

    hint = "it was damaged or edited; rerun the embed command (it rewrites the manifest from the shards)"
    try:
        manifest = parse_json(mp.read_bytes(), f"{out_dir}/{MANIFEST}", expect=dict, hint=hint)
    except FileFormatError as e:
        raise VerifyError(str(e)) from None
    need = {"options": dict, "shards": list, "counts": dict}
    bad = [k for k, t in need.items() if not isinstance(manifest.get(k), t)]
    opt = manifest.get("options") or {}
    if not bad:
        bad = [k for k in ("inputs", "format", "text_field", "id_field", "title_field", "unit_size", "dimensions")
               if k not in opt]
        bad += [k for k in ("records", "bad_records") if not isinstance(manifest["counts"].get(k), int)]
        if not all(isinstance(s, dict) and {"name", "sha256"} <= set(s) for s in manifest["shards"]):
            bad.append("shards")
    if bad:
        raise VerifyError(f"{out_dir}/{MANIFEST} lacks or mangles {', '.join(bad)}; {hint}")
    return manifest, opt


def verify(out_dir: str, inputs: Sequence[str] | None = None, check_values: bool = True) -> dict:
    """Check that DIR holds every input record exactly once: the shard for every unit, checksums,
    ids equal to the input's in order, bad records accounted for, no extra files."""
    out = shards.epath(out_dir)
    mp = out / MANIFEST
    if not mp.exists():
        raise VerifyError(f"{out_dir}/{MANIFEST} is missing: the job has not finished; rerun the embed command "
                          f"to resume it")
    manifest, opt = _read_manifest(mp, out_dir)
    paths = expand_inputs(inputs) if inputs else opt["inputs"]
    if list(paths) != list(opt["inputs"]):
        raise VerifyError(f"--input {' '.join(paths)} differs from the job's inputs {' '.join(opt['inputs'])}; "
                          f"pass the same paths, in the same order")
    spec = InputSpec(tuple(paths), opt["format"], opt["text_field"], opt["id_field"], opt["title_field"],
                     opt["unit_size"])
    problems: list[str] = []
    expected_files = set()
    n_records = n_bad = 0
    listed = {s["name"]: s for s in manifest["shards"]}
    id_lines = []
    for u in iter_units(spec):
        name = u.name
        expected_files |= {f"{name}.npy", f"{name}.ids.jsonl", f"{name}.json"}
        meta = shards.read_meta(out, name)
        problem = shards.check_shard(out, name, meta)
        if problem:
            problems.append(f"shard {name} ({u.path} lines {u.first_line}-{u.last_line}): {problem}")
            continue
        if name not in listed or listed[name]["sha256"] != meta["sha256"]:
            problems.append(f"shard {name} is not in the manifest as written")
        fingerprinted = "input_sha256" in meta or manifest.get("format_version", 1) >= 2  # format 1 had none
        if fingerprinted and meta.get("input_sha256") != u.sha256:
            problems.append(f"shard {name}: {u.path} lines {u.first_line}-{u.last_line} changed since the shard was "
                            f"written (input fingerprint differs); rerun the embed command to redo it")
            continue
        emb, ids = shards.load_shard(out, name)
        want = [r.id for r in u.records]
        if ids != want:
            missing = len(set(map(json.dumps, want)) - set(map(json.dumps, ids)))
            problems.append(f"shard {name}: ids differ from the input ({len(ids)} stored, {len(want)} expected, "
                            f"{missing} missing)")
        if emb.shape != (len(want), opt["dimensions"]) or emb.dtype != np.float32:
            problems.append(f"shard {name}: embeddings {emb.shape} {emb.dtype}, expected "
                            f"({len(want)}, {opt['dimensions']}) float32")
        elif check_values and len(want):
            if not np.isfinite(emb).all():
                problems.append(f"shard {name}: non-finite embeddings")
            elif not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3):
                problems.append(f"shard {name}: embeddings are not unit length")
        if [b["line"] for b in meta["bad"]] != [b.line for b in u.bad]:
            problems.append(f"shard {name}: bad records {[b['line'] for b in meta['bad']]} recorded, input has "
                            f"{[b.line for b in u.bad]}")
        n_records += len(want)
        n_bad += len(u.bad)
        id_lines += [(r.id, u.path, r.line) for r in u.records]
    extra = sorted(set(shards.list_shard_files(out)) - expected_files)
    if extra:
        problems.append(f"{len(extra)} files in shards/ belong to no input unit (e.g. {extra[0]})")
    if len(manifest["shards"]) != len(expected_files) // 3:
        problems.append(f"the manifest lists {len(manifest['shards'])} shards, the input has {len(expected_files) // 3} units")
    errs = (out / ERRORS).read_text().splitlines() if (out / ERRORS).exists() else None
    if errs is None or len(errs) != n_bad:
        problems.append(f"{ERRORS} has {None if errs is None else len(errs)} entries, the input has {n_bad} bad records")
    dups = find_duplicates(id_lines)
    if dups != manifest.get("duplicate_ids", []):
        problems.append(f"the input has {len(dups)} records with a repeated id, the manifest lists "
                        f"{len(manifest.get('duplicate_ids', []))}")
    c = manifest["counts"]
    if c["records"] != n_records or c["bad_records"] != n_bad:
        problems.append(f"manifest counts {c['records']} records/{c['bad_records']} bad, the input has "
                        f"{n_records}/{n_bad}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VerifyError(problems[0] + more)
    return {"records": n_records, "bad_records": n_bad, "shards": len(expected_files) // 3, "duplicate_ids": dups}


__all__ = ["EmbedOptions", "JobContext", "JobStats", "Round", "setup", "tokenize_unit", "plan_round", "host_share",
           "step", "write", "unit_padded_tokens", "read_ahead",
           "finalize", "my_units", "run_embed", "verify", "write_manifest", "format_summary", "model_hash",
           "JobError", "VerifyError", "MANIFEST", "ERRORS"]
