"""``embeddinggemma-jax embed`` and ``embeddinggemma-jax verify``."""

from __future__ import annotations

import json
import sys


def _mesh(s: str) -> tuple[int, int]:
    try:
        d, f = (int(x) for x in s.split(","))
    except ValueError:
        raise ValueError(f"--mesh takes DATA,FSDP (e.g. 4,2), got {s!r}") from None
    return d, f


def _ints(s: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted(int(x) for x in s.split(",")))
    except ValueError:
        raise ValueError(f"--buckets takes comma-separated lengths (e.g. 64,128,256), got {s!r}") from None
    if not out or out[0] < 1:
        raise ValueError(f"--buckets lengths must be positive, got {s!r}")
    return out


def add_parser(sub) -> None:
    from embeddinggemma_jax.hub import DEFAULT_MODEL
    from embeddinggemma_jax.topologies import TOPOLOGIES

    p = sub.add_parser("embed", help="embed a corpus into sharded .npy files (resumable, multi-host)",
                       description="Stream the inputs, embed every record on all devices (and all hosts with "
                                   "--multihost), write atomic shards plus manifest.json. Rerunning the same command "
                                   "resumes after a crash: finished shards are kept.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, Orbax checkpoint or hub id ({DEFAULT_MODEL})")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="input files (local or gs://)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (shared by all hosts)")
    p.add_argument("--format", choices=["jsonl", "text", "parquet"], help="default: from the file extension")
    p.add_argument("--text-field", default="text", help="jsonl/parquet field with the text (default: text)")
    p.add_argument("--id-field", help="jsonl/parquet field with the record id (default: FILE:LINE)")
    p.add_argument("--title-field", help="field with a title for the document prompt 'title: T | text: ...'")
    p.add_argument("--prompt-name", default="document", help="model prompt to prepend (default: document; '' for none)")
    p.add_argument("--dimensions", type=int, help="Matryoshka size (768 full, 512, 256, 128)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the topology's (bfloat16), else float32")
    p.add_argument("--topology", choices=sorted(TOPOLOGIES, key=lambda n: int(n.split("-")[1])),
                   help="TPU slice config from tpu/ (mesh, dtype, rows per bucket)")
    p.add_argument("--mesh", type=_mesh, help="DATA,FSDP mesh shape (default: all devices on data)")
    p.add_argument("--tokens-per-device", type=int, help="token budget per device per batch (overrides the topology)")
    p.add_argument("--buckets", type=_ints, help="padded lengths, comma-separated (default: the topology's)")
    p.add_argument("--no-shrink", action="store_true",
                   help="always use full-size batches (fewer compiled shapes, more padding on sparse buckets)")
    p.add_argument("--unit-size", type=int, default=16384, help="input lines (parquet: rows) per work unit = per output shard (16384)")
    p.add_argument("--on-bad-record", choices=["fail", "skip"], default="fail",
                   help="fail (default) names the file and line; skip writes it to errors.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() (auto-detected on TPU pods); run on every worker")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for clusters without auto-detection")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("verify", help="check an embed output holds every input record exactly once",
                       description="Re-read the inputs and check every unit's shard: present, checksums, ids in "
                                   "input order, bad records in errors.jsonl, nothing extra.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--input", nargs="+", metavar="PATH", help="the job's inputs (default: those in the manifest)")
    p.set_defaults(func=cmd_verify)


def cmd_embed(args) -> int:
    from embeddinggemma_jax.batch.job import EmbedOptions, format_summary, run_embed

    o = EmbedOptions(model=args.model, inputs=args.input, output=args.output, format=args.format,
                     text_field=args.text_field, id_field=args.id_field, title_field=args.title_field,
                     prompt_name=args.prompt_name or None, dimensions=args.dimensions, dtype=args.dtype,
                     topology=args.topology, mesh=args.mesh, tokens_per_device=args.tokens_per_device,
                     unit_size=args.unit_size, buckets=args.buckets, shrink=not args.no_shrink,
                     on_bad_record=args.on_bad_record, progress=not args.no_progress,
                     coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                     multihost=args.multihost)
    s = run_embed(o)
    import jax

    if jax.process_index() == 0:
        print(json.dumps(s) if args.json else format_summary(s), file=sys.stdout if args.json else sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from embeddinggemma_jax.batch.job import verify

    r = verify(args.dir, args.input)
    print(f"ok: {r['records']:,} records in {r['shards']} shards, each exactly once; "
          f"{r['bad_records']} bad records listed in errors.jsonl")
    return 0
