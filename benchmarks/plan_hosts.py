"""Padding efficiency of the job's plan per topology and host count, tokenising the corpus once.

The same planner and round rule as `embeddinggemma-jax embed --plan-only --topology T --simulate-hosts N`
(``batch.plan.simulate``), for several topologies from one tokenisation (the CLI tokenises per run):

    python benchmarks/make_corpus.py /tmp/docs1m.jsonl --lines 1000000
    python benchmarks/plan_hosts.py /tmp/docs1m.jsonl [--model google/embeddinggemma-300m]
    python benchmarks/plan_hosts.py /tmp/docs.jsonl --tokens-per-chip 65536,131072   # batch size vs padding
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--unit-size", type=int, default=16384)
    ap.add_argument("--topologies", default="v5litepod-1,v5litepod-8,v5litepod-16,v5litepod-64,v5litepod-256")
    ap.add_argument("--tokens-per-chip", default="",
                    help="comma-separated token budgets per chip to compare (default: the topologies' rows)")
    a = ap.parse_args(argv)
    from embeddinggemma_jax import hub, topologies
    from embeddinggemma_jax.batch.plan import job_planner, simulate
    from embeddinggemma_jax.batch.readers import InputSpec, iter_units
    from embeddinggemma_jax.tokenize import TextTokenizer
    from embeddinggemma_jax.weights import read_folder_configs

    folder = hub.resolve(a.model)
    enc, head = read_folder_configs(folder)
    tok = TextTokenizer(folder / "tokenizer.json", head.max_seq_length, enc.pad_token_id, enc.eos_token_id)
    prompt = head.prompts["document"]
    t = time.perf_counter()
    units = [(u.file_index + u.unit_index, tok.count([prompt + r.text for r in u.records]))
             for u in iter_units(InputSpec((a.input,), "jsonl", unit_size=a.unit_size))]
    print(f"tokenised {sum(len(x) for _, x in units):,} records in {time.perf_counter() - t:.0f} s", flush=True)
    budgets = [int(x) for x in a.tokens_per_chip.split(",") if x] or [None]
    print("| topology | hosts | tokens/chip | padding efficiency | global batches | compiled shapes |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name in a.topologies.split(","):
        topo = topologies.get(name)
        for budget in budgets:
            r = simulate(units, topo.hosts, job_planner(name, None, budget, True, head.max_seq_length, tok.pad_id,
                                                        topo.hosts))
            print(f"| {name} | {topo.hosts} | {budget or 'config'} | {r['padding_efficiency']:.3f} | "
                  f"{r['batches']:,} | {r['compiled_shapes']} |", flush=True)
            print(json.dumps({k: v for k, v in r.items() if k != "buckets"} | {"tokens_per_chip": budget}),
                  flush=True)


if __name__ == "__main__":
    main()
