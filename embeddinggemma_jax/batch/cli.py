"""``embeddinggemma-jax embed`` and ``embeddinggemma-jax verify``: flags derived from ``EmbedOptions``."""

from __future__ import annotations

import json
import sys

from embeddinggemma_jax import options
from embeddinggemma_jax.batch.context import EmbedOptions
from embeddinggemma_jax.errors import JobError

EMBED_DESCRIPTION = ("Stream the inputs, embed every record on all devices (and all hosts with --multihost), write "
                     "atomic shards plus manifest.json. Rerunning the same command resumes after a crash: finished "
                     "shards are kept.")
VERIFY_DESCRIPTION = ("Re-read the inputs and check every unit's shard: present, checksums, ids in input order, bad "
                      "records in errors.jsonl, nothing extra.")


def add_embed_arguments(p) -> None:
    options.add_arguments(p, EmbedOptions)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_verify_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--input", nargs="+", metavar="PATH", help="the job's inputs (default: those in the manifest)")


def cmd_embed(args, stages=None) -> int:
    """``stages``: ``pipeline.Stages`` to run instead of the real ones (a test's slower step)."""
    import jax

    from embeddinggemma_jax.batch.pipeline import Stages
    from embeddinggemma_jax.batch.summary import format_summary

    def run_embed(o):
        from embeddinggemma_jax.batch.pipeline import run_embed

        return run_embed(o, stages or Stages())

    o = options.build(EmbedOptions, args)
    if o.plan_only:
        from embeddinggemma_jax.batch.plan import format_plan, plan_only

        if o.simulate_hosts is not None and o.simulate_hosts < 1:
            raise JobError(f"--simulate-hosts must be >= 1, got {o.simulate_hosts}")
        r = plan_only(o, o.simulate_hosts)
        print(json.dumps(r) if args.json else format_plan(r))
        return 0
    if not args.json:
        s = run_embed(o)
        if jax.process_index() == 0:
            print(format_summary(s), file=sys.stderr)
        return 0
    from embeddinggemma_jax.io_utils import stdout_for_one_document

    with stdout_for_one_document() as document:  # stdout: the summary alone, whatever the libraries print
        s = run_embed(o)
        if jax.process_index() == 0:
            document.append(json.dumps(s))
    return 0


def cmd_verify(args) -> int:
    from embeddinggemma_jax.batch.verify import verify

    r = verify(args.dir, args.input)
    print(f"ok: {r['records']:,} records in {r['shards']} shards, each exactly once; "
          f"{r['bad_records']} bad records listed in errors.jsonl")
    for d in r["duplicate_ids"][:10]:
        print(f"duplicate id {json.dumps(d['id'])}: {d['first']['file']}:{d['first']['line']} and "
              f"{d['again']['file']}:{d['again']['line']} (both embedded)")
    if r["duplicate_ids"]:
        print(f"{len(r['duplicate_ids']):,} records repeat an earlier record's id; all are listed in manifest.json")
    return 0
