"""The resumable, multi-host embedding job and its verifier.

Flow per host: stream the inputs unit by unit (``readers``); for each unit this host owns whose
shard is not already done: apply the prompt, tokenise, cut into fixed-shape batches
(``batching.BatchPlanner``), run the sharded step (``step``), write the shard (``shards``). Unit ``(f, k)``
belongs to host ``(f + k) % processes``.

Multi-host lock-step: every jitted call is a collective over all hosts, so in each round (one
unit per host) the hosts exchange how many batches each has per bucket and all run the maximum,
a host with fewer feeding all-padding batches. Batch shapes depend only on the bucket, so a
record's embedding never depends on what the other hosts were doing.

Determinism for resume: units, batches and shapes are pure functions of the input, so a rerun
(after a crash, ``kill -9``, preemption) skips done shards and rebuilds the rest bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from embeddinggemma_jax.batch import shards
from embeddinggemma_jax.batch.readers import (
    FORMATS,
    InputSpec,
    Unit,
    expand_inputs,
    infer_format,
    input_sizes,
    iter_units,
)
from embeddinggemma_jax.batching import (
    JOB_LENGTH_BUCKETS,
    BatchPlanner,
    PlannedBatch,
    buckets_for,
    padding_efficiency,
    round_rows,
)
from embeddinggemma_jax.errors import BadRecordError, JobError, VerifyError
from embeddinggemma_jax.hub import DEFAULT_MODEL
from embeddinggemma_jax.options import ints, option
from embeddinggemma_jax.quant import MODE_NAMES
from embeddinggemma_jax.topologies import TOPOLOGIES

MANIFEST = "manifest.json"
JOB = "job.json"
ERRORS = "errors.jsonl"
FORMAT_VERSION = 1




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
    output: str = option(None, "output folder (shared by all hosts)", metavar="DIR", required=True)
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
    multihost: bool = option(False, "call jax.distributed.initialize() (auto-detected on TPU pods); run on every "
                                    "worker")
    coordinator: str | None = option(None, "HOST:PORT of process 0, for clusters without auto-detection")
    num_processes: int | None = option(None, "number of processes (with --coordinator)")
    process_id: int | None = option(None, "this process's index (with --coordinator)")

    def __post_init__(self):
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


def _rows_table(topo, buckets, tokens_per_device):
    table = dict(topo.rows_per_chip) if topo is not None and tokens_per_device is None else {}
    budget = tokens_per_device or (topo.tokens_per_chip if topo is not None else 16384)
    return {L: int(table.get(L) or round_rows(max(1, budget // L))) for L in buckets}


def run_embed(o: EmbedOptions) -> dict:
    if o.on_bad_record not in ("fail", "skip"):
        raise JobError(f"--on-bad-record must be fail or skip, got {o.on_bad_record!r}")
    if o.unit_size < 1:
        raise JobError(f"--unit-size must be >= 1, got {o.unit_size}")
    if not o.inputs:
        raise JobError("no --input given; pass one or more files")
    if o.multihost or o.coordinator:
        from embeddinggemma_jax.batch.step import init_distributed

        init_distributed(o.coordinator, o.num_processes, o.process_id)
    import jax

    from embeddinggemma_jax import EmbeddingGemma, topologies
    from embeddinggemma_jax.batch.step import ShardedEncoder, allgather_ints, barrier
    from embeddinggemma_jax.head import apply_dimensions, check_dimensions
    from embeddinggemma_jax.model import DOCUMENT_TEMPLATE
    from embeddinggemma_jax.sharding import DATA_PARALLEL_RULES, make_mesh

    P, me = jax.process_count(), jax.process_index()
    topo = topologies.get(o.topology) if o.topology else None
    if topo is not None and jax.device_count() != topo.chips:
        raise JobError(f"topology {topo.name} has {topo.chips} chips but JAX sees {jax.device_count()} devices; "
                       f"run on that slice (with --multihost on every worker) or pick the matching --topology")
    dtype = o.dtype or (topo.dtype if topo else "float32")
    mesh_shape = tuple(o.mesh) if o.mesh else (topo.mesh_shape if topo else (jax.device_count(), 1))
    rules = topo.rules_table if topo else DATA_PARALLEL_RULES
    inputs = expand_inputs(o.inputs)
    fmt = o.format or infer_format(inputs)
    spec = InputSpec(tuple(inputs), fmt, o.text_field, o.id_field, o.title_field, o.unit_size)
    input_sizes(spec.paths)  # fail early on a missing input

    t_start = time.perf_counter()
    if o.quantize in ("mixed", "int4-weights"):  # XLA rejects the int4 arrays' layout in the pre-compiled steps
        raise JobError(f"--quantize {o.quantize} holds int4 weights, which the sharded embed job cannot run yet; "
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
    per_dev = _rows_table(topo, buckets, o.tokens_per_device)
    local_rows = {L: r * enc.local_split for L, r in per_dev.items()}
    planner = BatchPlanner(buckets, local_rows, model.tokenizer.pad_id, shrink="fine" if o.shrink and P == 1 else "none",
                           row_multiple=enc.local_split)

    options = dict(spec.options(), prompt_name=o.prompt_name, prompt=prompt, dimensions=dims, dtype=dtype,
                   quantize=o.quantize,
                   topology=o.topology, mesh=list(mesh_shape), rows_per_device={str(k): v for k, v in per_dev.items()},
                   buckets=list(buckets), shrink=o.shrink, on_bad_record=o.on_bad_record, format_version=FORMAT_VERSION)
    model_info = {"source": str(model.source), "sha256": model_hash(model.source)}
    job = {"options": options, "model": model_info}
    out = shards.epath(o.output)
    if me == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / shards.SHARDS).mkdir(parents=True, exist_ok=True)
    barrier("embed-mkdir")
    job_path = out / JOB
    if job_path.exists():
        old = json.loads(job_path.read_text())
        if old != job:
            diff = sorted(k for k in set(old.get("options", {})) | set(options)
                          if old.get("options", {}).get(k) != options.get(k))
            if old.get("model") != model_info:
                diff.append("model")
            raise JobError(f"{o.output} holds a run with different settings ({', '.join(diff)}); rerun with the "
                           f"same command to resume, or use a new --output")
    barrier("embed-job-checked")
    if me == 0:
        shards.remove_temporaries(out)
        if not job_path.exists():
            shards.write_atomic(job_path, (json.dumps(job, indent=1) + "\n").encode())
    barrier("embed-start")

    stats = dict(records=0, bad=0, tokens=0, padded_tokens=0, units_done=0, units_skipped=0, batches=0)
    total_bytes = sum(input_sizes(spec.paths))
    bar = None
    if me == 0 and o.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="embed", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    t_loop = time.perf_counter()
    all_units: list[str] = []

    def my_units():
        for u in iter_units(spec, lambda f, k: (f + k) % P == me):
            all_units.append(u.name)
            if u.selected:
                yield u

    def prepare(u: Unit):
        """(token ids, lengths, planned batches), or None when the shard is already done."""
        if shards.check_shard(out, u.name) is None:
            return None
        if u.bad and o.on_bad_record == "fail":
            b = u.bad[0]
            raise BadRecordError(f"{u.path}:{b.line}: {b.error}; fix the record or pass --on-bad-record skip")
        texts = [(DOCUMENT_TEMPLATE.format(title=r.title or "none") if o.title_field else prompt) + r.text
                 for r in u.records]
        toks = model.tokenizer.encode(texts, truncate=True) if texts else []
        lens = [len(t) for t in toks]
        plan = planner.plan(lens)
        return toks, lens, plan

    def schedule(plan: list[PlannedBatch]) -> list[PlannedBatch | tuple[int, int]]:
        """This host's batches in the global order; (rows, L) entries are all-padding fillers."""
        if P == 1:
            return list(plan)
        counts = np.zeros(len(buckets), np.int64)
        for b in plan:
            counts[buckets.index(b.length)] += 1
        steps = allgather_ints(counts).max(axis=0)
        mine: dict[int, list[PlannedBatch]] = {}
        for b in plan:
            mine.setdefault(b.length, []).append(b)
        seq = []
        for j in reversed(range(len(buckets))):
            L = buckets[j]
            got = mine.get(L, [])
            seq += got + [(local_rows[L], L)] * int(steps[j] - len(got))
        return seq

    def run_unit(u: Unit | None, prep) -> None:
        toks, lens, plan = prep if prep is not None else ([], [], [])
        pending = []
        for b in schedule(plan):
            if isinstance(b, PlannedBatch):
                batch = planner.pad(toks, b)
                ids, mask = batch.ids, batch.mask
            else:
                ids, mask = np.zeros(b, np.int32), np.zeros(b, np.int32)
            pending.append((b, enc(ids, mask)))
            stats["batches"] += 1
            stats["padded_tokens"] += ids.size
        if u is None or prep is None:
            return
        raw = np.zeros((len(toks), model.dimensions), np.float32)
        for b, y in pending:
            if isinstance(b, PlannedBatch):
                raw[b.index] = enc.local_rows(y)[:len(b.index)]
        emb = apply_dimensions(raw, dims, True).astype(np.float32)
        meta = {"file": u.path, "file_index": u.file_index, "unit": u.unit_index, "first_line": u.first_line,
                "last_line": u.last_line, "blank": u.blank, "tokens": int(sum(lens)),
                "padded_tokens": int(sum(b.rows * b.length for b in plan)),
                "bad": [b.to_json(u.path) for b in u.bad]}
        shards.write_shard(out, u.name, emb, [r.id for r in u.records], meta)
        stats["records"] += len(toks)
        stats["bad"] += len(u.bad)
        stats["tokens"] += int(sum(lens))
        stats["units_done"] += 1

    def tick(u: Unit | None) -> None:
        if bar is None or u is None:
            return
        bar.n = u.bytes_done
        dt = max(1e-9, time.perf_counter() - t_loop)
        bar.set_postfix_str(f"{stats['records'] / dt:,.0f} rec/s, {stats['tokens'] / dt:,.0f} tok/s, "
                            f"{stats['units_done']} shards", refresh=True)

    units = my_units()
    while True:
        u = next(units, None)
        prep = prepare(u) if u is not None else None
        if u is not None and prep is None:
            stats["units_skipped"] += 1
        if P > 1:
            # every host must agree on whether another round runs (all collectives are lock-step)
            flags = allgather_ints([u is None, prep is None])
            if flags[:, 0].all():
                break
            if flags[:, 1].all():
                tick(u)
                continue
        elif u is None:
            break
        elif prep is None:
            tick(u)
            continue
        run_unit(u, prep)
        tick(u)
    if bar is not None:
        bar.n = total_bytes
        bar.close()
    wall = time.perf_counter() - t_loop

    if P > 1:  # this run's totals over all hosts (split in 30-bit halves: int32 collectives)
        keys = sorted(stats)
        g = allgather_ints([x for k in keys for x in divmod(stats[k], 1 << 30)]).astype(np.int64).sum(0)
        stats = {k: int(g[2 * i]) * (1 << 30) + int(g[2 * i + 1]) for i, k in enumerate(keys)}
    barrier("embed-shards-written")
    manifest = None
    if me == 0:
        manifest = write_manifest(out, all_units, job)
    barrier("embed-manifest")
    summary = dict(stats, wall_seconds=round(wall, 3), total_seconds=round(time.perf_counter() - t_start, 3),
                   compile_seconds=round(enc.compile_seconds, 3), compiled_shapes=enc.num_shapes,
                   processes=P, devices=jax.device_count(), mesh=list(mesh_shape),
                   records_per_second=round(stats["records"] / max(wall, 1e-9), 2),
                   tokens_per_second=round(stats["tokens"] / max(wall, 1e-9), 2),
                   padding_efficiency_this_run=round(padding_efficiency(stats["tokens"], stats["padded_tokens"]), 4)
                   if stats["padded_tokens"] else None)
    if manifest is not None:
        summary["manifest_counts"] = manifest["counts"]
    return summary


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
    manifest = {
        "format_version": FORMAT_VERSION,
        "options": job["options"],
        "model": job["model"],
        "counts": {"records": sum(m["records"] for m in metas), "bad_records": len(errors),
                   "blank_lines": sum(m["blank"] for m in metas), "shards": len(metas),
                   "tokens": tokens, "padded_tokens": padded,
                   "padding_efficiency": round(padding_efficiency(tokens, padded), 6)},
        "shards": [{k: m[k] for k in ("name", "file", "first_line", "last_line", "records", "sha256")} for m in metas],
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
    return "\n".join(lines)


def verify(out_dir: str, inputs: Sequence[str] | None = None, check_values: bool = True) -> dict:
    """Check that DIR holds every input record exactly once: the shard for every unit, checksums,
    ids equal to the input's in order, bad records accounted for, no extra files."""
    out = shards.epath(out_dir)
    mp = out / MANIFEST
    if not mp.exists():
        raise VerifyError(f"{out_dir}/{MANIFEST} is missing: the job has not finished; rerun the embed command "
                          f"to resume it")
    manifest = json.loads(mp.read_text())
    opt = manifest["options"]
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
    extra = sorted(set(shards.list_shard_files(out)) - expected_files)
    if extra:
        problems.append(f"{len(extra)} files in shards/ belong to no input unit (e.g. {extra[0]})")
    if len(manifest["shards"]) != len(expected_files) // 3:
        problems.append(f"the manifest lists {len(manifest['shards'])} shards, the input has {len(expected_files) // 3} units")
    errs = (out / ERRORS).read_text().splitlines() if (out / ERRORS).exists() else None
    if errs is None or len(errs) != n_bad:
        problems.append(f"{ERRORS} has {None if errs is None else len(errs)} entries, the input has {n_bad} bad records")
    c = manifest["counts"]
    if c["records"] != n_records or c["bad_records"] != n_bad:
        problems.append(f"manifest counts {c['records']} records/{c['bad_records']} bad, the input has "
                        f"{n_records}/{n_bad}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VerifyError(problems[0] + more)
    return {"records": n_records, "bad_records": n_bad, "shards": len(expected_files) // 3}


__all__ = ["EmbedOptions", "run_embed", "verify", "write_manifest", "format_summary", "model_hash",
           "JobError", "VerifyError", "MANIFEST", "ERRORS"]
