"""One process against two (jax.distributed over gloo, on this machine) running the same `embed` job.

Writes N standard-library docstrings (short: median ~30 tokens) as jsonl and runs `embed` with one
process and with two (one CPU device each, --coordinator on localhost), alternating 1, 2, 1, 2, ...
By default no persistent compilation cache: every run compiles its batch shapes (two processes compile
each shape once, on process 0, and share it). With --cache DIR all runs share that cache
(EMBEDDINGGEMMA_JAX_COMPILATION_CACHE); on CPU only process 0 then loads from it, process 1 still
compiles (JAX keys CPU entries by the process's devices and writes from process 0 only). Per run it prints the wall time of the whole command
(start to exit: imports, weights, job), the job's own times from its summary (total: load + loop;
loop: the rounds, compiling included; compile: the slowest process's), the padding efficiency, and the 1-minute
load average before the run (the machine may be shared); then the ratios per pair, and checks that
both layouts wrote the same embeddings.

    python benchmarks/job_processes.py [--model google/embeddinggemma-300m] [--records 120] [--unit-size 16]
                                       [--repeats 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(args, out, processes, cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("EMBEDDINGGEMMA_JAX_COMPILATION_CACHE", None)
    if cache:
        env["EMBEDDINGGEMMA_JAX_COMPILATION_CACHE"] = str(cache)
    base = [sys.executable, "-m", "embeddinggemma_jax.cli", "embed", *args, "--output", str(out), "--json",
            "--no-progress"]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    if processes == 1:
        r = subprocess.run(base, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        outs = [r.stdout]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ps = [subprocess.Popen(base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                       "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(processes)]
        outs = []
        for p in ps:
            o, e = p.communicate()
            if p.returncode:
                raise SystemExit(e[-2000:])
            outs.append(o)
    wall = time.perf_counter() - t
    # gloo prints its connection lines on stdout too: the summary is the last JSON line
    s = json.loads(next(line for line in reversed(outs[0].splitlines()) if line.startswith("{")))
    return {"processes": processes, "wall": wall, "total": s["total_seconds"], "loop": s["wall_seconds"],
            "compile": s["compile_seconds"], "padding_efficiency": s["manifest_counts"]["padding_efficiency"],
            "batches": s["batches"], "shapes": s["compiled_shapes"], "load_before": load}


def show(tag, r):
    print(f"{tag} {r['processes']} process(es): wall {r['wall']:.1f} s, job total {r['total']:.1f} s, loop "
          f"{r['loop']:.1f} s (compile {r['compile']:.1f} s), padding efficiency {r['padding_efficiency']:.3f}, "
          f"{r['batches']} batches, {r['shapes']} shapes, load average before {r['load_before']:.1f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--records", type=int, default=120)
    ap.add_argument("--unit-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (1 process, then 2)")
    ap.add_argument("--cache", help="persistent compilation cache folder shared by all runs (default: none)")
    a = ap.parse_args(argv)
    from embeddinggemma_jax.batch import shards
    from embeddinggemma_jax.bench import top_level_stdlib_docstrings

    docs = top_level_stdlib_docstrings()
    random.Random(0).shuffle(docs)
    with tempfile.TemporaryDirectory() as d:
        cache = a.cache
        src = Path(d) / "docs.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs[:a.records])))
        args = ["--model", a.model, "--input", str(src), "--id-field", "id", "--unit-size", str(a.unit_size)]
        pairs = []
        for i in range(a.repeats):
            tag = f"pair {i + 1}"
            pair = {}
            for n in (1, 2):
                pair[n] = run(args, Path(d) / f"p{n}-{i}", n, cache)
                show(tag, pair[n])
            pairs.append(pair)
            print(f"{tag} 2 processes / 1: wall {pair[2]['wall'] / pair[1]['wall']:.2f}x, job total "
                  f"{pair[2]['total'] / pair[1]['total']:.2f}x, loop {pair[2]['loop'] / pair[1]['loop']:.2f}x, "
                  f"padding efficiency {pair[2]['padding_efficiency'] / pair[1]['padding_efficiency']:.3f}x",
                  flush=True)
        ids1, e1 = shards.load_all(Path(d) / "p1-0")
        ids2, e2 = shards.load_all(Path(d) / "p2-0")
        assert ids1 == ids2
        print(f"max abs difference of the embeddings (1 vs 2 processes): {np.abs(e1 - e2).max():.2e}")
        if pairs:
            for k in ("wall", "total", "loop"):
                r = sorted(p[2][k] / p[1][k] for p in pairs)
                print(f"2 processes / 1, {k}: median {r[len(r) // 2]:.2f}x over {len(r)} pairs "
                      f"({', '.join(f'{x:.2f}' for x in r)})")
        print(json.dumps({"pairs": [{str(n): r for n, r in p.items()} for p in pairs]}))


if __name__ == "__main__":
    main()
