"""Padding efficiency of the job's plan per topology and host count, tokenising the corpus once.

The same planner and round rule as `embeddinggemma-jax embed --plan-only --topology T --simulate-hosts N`
(``batch.plan.simulate``), for several topologies from one tokenisation (the CLI tokenises per run):

    python benchmarks/make_corpus.py /tmp/docs1m.jsonl --lines 1000000
    python benchmarks/plan_hosts.py /tmp/docs1m.jsonl [--model google/embeddinggemma-300m]
    python benchmarks/plan_hosts.py /tmp/docs.jsonl --tokens-per-chip 65536,131072   # batch size vs padding

``--out benchmarks/padding_per_topology.json`` keeps the rows; docs/batch-job.md's table and its chart
(``benchmarks/doc_charts.py``) are generated from that file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "padding_per_topology.json"


def blocks() -> dict:
    """docs/batch-job.md's padding table, from ``RESULT``."""
    if not RESULT.exists():
        return {}
    d = json.loads(RESULT.read_text())
    rows = ["| topology | hosts | padding efficiency | global batches | compiled shapes |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {r['topology']} | {r['hosts']} | {r['padding_efficiency']:.3f} | {r['batches']:,} | "
             f"{r['compiled_shapes']} |" for r in d["rows"] if r.get("tokens_per_chip") is None]
    head = (f"{d['records']:,} records, {d['tokens']:,} tokens with the {d['prompt']} prompt, unit size "
            f"{d['unit_size']:,}; corpus: `{d['corpus']}`; the rows per chip of `tpu/configs`; from "
            f"`benchmarks/{RESULT.name}`.")
    return {"batch-job.md": {"PADDING_PER_TOPOLOGY": head + "\n\n" + "\n".join(rows)}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--unit-size", type=int, default=16384)
    ap.add_argument("--topologies", default="v5litepod-1,v5litepod-8,v5litepod-16,v5litepod-64,v5litepod-256")
    ap.add_argument("--tokens-per-chip", default="",
                    help="comma-separated token budgets per chip to compare (default: the topologies' rows)")
    ap.add_argument("--out", help="also write the rows (and the corpus's counts) to this JSON file")
    ap.add_argument("--corpus", default="", help="how the input was made, for --out (e.g. the make_corpus command)")
    a = ap.parse_args(argv)
    if a.out and Path(a.out).exists():
        try:
            ours = {"corpus", "rows", "unit_size"} <= set(json.loads(Path(a.out).read_text()))
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise SystemExit(f"--out {a.out} exists and is not a plan_hosts result; refusing to replace it: pass a new file")
    from embeddinggemma_jax import topologies
    from embeddinggemma_jax.io_utils import atomic_write_json
    from embeddinggemma_jax.batch.plan import job_planner, simulate
    from embeddinggemma_jax.batch.readers import InputSpec, iter_units
    from embeddinggemma_jax.source import read_source

    src = read_source(a.model)
    head, tok = src.head_config, src.tokenizer()
    prompt = head.prompts["document"]
    t = time.perf_counter()
    units = [(u.file_index + u.unit_index, tok.count([prompt + r.text for r in u.records]))
             for u in iter_units(InputSpec((a.input,), "jsonl", unit_size=a.unit_size))]
    print(f"tokenised {sum(len(x) for _, x in units):,} records in {time.perf_counter() - t:.0f} s", flush=True)
    budgets = [int(x) for x in a.tokens_per_chip.split(",") if x] or [None]
    out = {"corpus": a.corpus or a.input, "records": sum(len(x) for _, x in units),
           "tokens": int(sum(sum(x) for _, x in units)), "unit_size": a.unit_size, "model": a.model,
           "prompt": "document", "rows": []}
    print("| topology | hosts | tokens/chip | padding efficiency | global batches | compiled shapes |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name in a.topologies.split(","):
        topo = topologies.get(name)
        for budget in budgets:
            r = simulate(units, topo.hosts, job_planner(name, None, budget, True, head.max_seq_length, tok.pad_id,
                                                        topo.hosts))
            print(f"| {name} | {topo.hosts} | {budget or 'config'} | {r['padding_efficiency']:.3f} | "
                  f"{r['batches']:,} | {r['compiled_shapes']} |", flush=True)
            row = {k: v for k, v in r.items() if k != "buckets"} | {"topology": name, "hosts": topo.hosts,
                                                                     "tokens_per_chip": budget}
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
            if a.out:
                atomic_write_json(a.out, out)


if __name__ == "__main__":
    main()
