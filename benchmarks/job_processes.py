"""One process against two (jax.distributed over gloo, on this machine) running the same `embed` job.

Writes N standard-library docstrings as jsonl, runs `embed` once with one process and once with two
(one CPU device each, --coordinator on localhost), side by side, and prints each run's wall time and
padding efficiency (from its summary) and their ratios; checks both outputs hold the same embeddings.

    python benchmarks/job_processes.py [--model google/embeddinggemma-300m] [--records 120] [--unit-size 16]
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from make_corpus import stdlib_docstrings  # noqa: E402


def run(args, out, processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "embeddinggemma_jax.cli", "embed", *args, "--output", str(out), "--json",
            "--no-progress"]
    t = time.perf_counter()
    if processes == 1:
        r = subprocess.run(base, env=env, capture_output=True, text=True, check=True)
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
    return wall, json.loads(next(line for line in reversed(outs[0].splitlines()) if line.startswith("{")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--records", type=int, default=120)
    ap.add_argument("--unit-size", type=int, default=16)
    a = ap.parse_args(argv)
    from embeddinggemma_jax.batch import shards

    docs = stdlib_docstrings()
    random.Random(0).shuffle(docs)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "docs.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs[:a.records])))
        args = ["--model", a.model, "--input", str(src), "--id-field", "id", "--unit-size", str(a.unit_size)]
        res = {}
        for n in (1, 2):
            wall, s = run(args, Path(d) / f"p{n}", n)
            res[n] = (wall, s["manifest_counts"]["padding_efficiency"])
            print(f"{n} process(es): wall {wall:.1f} s (job loop {s['wall_seconds']:.1f} s), padding efficiency "
                  f"{res[n][1]:.3f}, {s['batches']} batches, {s['compiled_shapes']} shapes", flush=True)
        ids1, e1 = shards.load_all(Path(d) / "p1")
        ids2, e2 = shards.load_all(Path(d) / "p2")
        assert ids1 == ids2
        print(f"max abs difference of the embeddings: {np.abs(e1 - e2).max():.2e}")
        print(f"2 processes / 1: wall {res[2][0] / res[1][0]:.2f}x, padding efficiency {res[2][1] / res[1][1]:.3f}x")


if __name__ == "__main__":
    main()
