"""An ``embed`` job's options (``EmbedOptions``) and ``setup``: validate them, start the processes, load
the model, build the planner and the sharded step, and claim the output folder, into the ``JobContext``
that the pipeline's stages (``batch.pipeline``) only read."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from embeddinggemma_jax.prompts import prompt_text
from embeddinggemma_jax.batch import shards
from embeddinggemma_jax.batch.manifest import FORMAT_VERSION, JOB
from embeddinggemma_jax.batch.readers import FORMATS, InputSpec, expand_inputs, infer_format, input_sizes
from embeddinggemma_jax.batching import JOB_LENGTH_BUCKETS, BatchPlanner, buckets_for
from embeddinggemma_jax.distributed import Distributed
from embeddinggemma_jax.errors import JobError
from embeddinggemma_jax.hub import DEFAULT_MODEL
from embeddinggemma_jax.options import ints, option
from embeddinggemma_jax.quant import MODE_NAMES
from embeddinggemma_jax.topologies import TOPOLOGIES, rows_table


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
    prompt = prompt_text(model.prompts, o.prompt_name or None, what="--prompt-name", error=JobError) or ""
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


__all__ = ["EmbedOptions", "JobContext", "setup", "check_output_folder", "model_hash"]
