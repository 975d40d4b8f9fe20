"""Bit-for-bit fingerprint of every output path on the tiny random model: encode, embed (the batch job),
serve (requests through the ASGI app, in process) and two train steps.

Each output's exact bytes go through sha256 and the hashes land in one JSON, so two commits can be
compared by running this script on each (refactors must keep every hash)::

    python benchmarks/bitwise_outputs.py --out /tmp/after.json
    git worktree add /tmp/base <commit> && (cd /tmp/base && PYTHONPATH=/tmp/base \
        python benchmarks/bitwise_outputs.py --out /tmp/before.json)
    python benchmarks/bitwise_outputs.py --compare /tmp/before.json /tmp/after.json

Runs on CPU in about a minute (JAX_PLATFORMS=cpu is set here). Only public entry points are used, so
the script runs unchanged on older commits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

TEXTS = ["alpha beta gamma", "a longer text than the window of eight tokens, with some more words in it",
         "Ünïcödé ✓ text", "x"]
TITLES = ["A title", None, "", "T"]


def sha(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()


def encode_hashes(folder: Path) -> dict:
    from embeddinggemma_jax import EmbeddingGemma

    out = {}
    for dtype in ("float32", "bfloat16"):
        m = EmbeddingGemma.from_pretrained(folder, dtype=dtype)
        out[f"encode/{dtype}"] = sha(m.encode(TEXTS))
        out[f"encode/{dtype}/query"] = sha(m.encode_query(TEXTS))
        out[f"encode/{dtype}/document_titles"] = sha(m.encode_document(TEXTS, titles=TITLES))
        out[f"encode/{dtype}/dims32_unnormalized"] = sha(m.encode(TEXTS, dimensions=32, normalize=False))
        out[f"encode/{dtype}/custom_prompt"] = sha(m.encode(TEXTS, prompt="task: x | query: "))
        del m
    return out


def embed_hashes(folder: Path, tmp: Path) -> dict:
    from embeddinggemma_jax.batch import shards
    from embeddinggemma_jax.cli import main

    corpus = tmp / "corpus.jsonl"
    rng = np.random.default_rng(3)
    with corpus.open("w") as f:
        for i in range(40):
            words = " ".join(f"w{int(x)}" for x in rng.integers(0, 500, int(rng.integers(1, 60))))
            rec = {"id": f"doc-{i}", "text": words}
            if i % 3:
                rec["title"] = f"title {i}"
            f.write(json.dumps(rec) + "\n")
    out = {}
    for name, extra in (("document_titles", ["--title-field", "title"]), ("query", ["--prompt-name", "query"])):
        dest = tmp / f"embed-{name}"
        rc = main(["embed", "--model", str(folder), "--input", str(corpus), "--output", str(dest), "--id-field", "id",
                   *extra])
        assert rc == 0, f"embed {name} exited {rc}"
        ids, emb = shards.load_all(dest)
        out[f"embed/{name}/ids"] = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        out[f"embed/{name}"] = sha(emb)
    return out


def serve_hashes(folder: Path) -> dict:
    from starlette.testclient import TestClient

    from embeddinggemma_jax.serve.app import Service, create_app
    from embeddinggemma_jax.serve.config import ServeOptions

    service = Service(ServeOptions(model=str(folder)))
    out = {}
    with TestClient(create_app(service)) as client:
        deadline = time.monotonic() + 300
        while client.get("/ready").status_code != 200:
            assert service.state != "failed", service.failure
            assert time.monotonic() < deadline, "server not ready after 300 s"
            time.sleep(0.1)
        bodies = {"openai": ("/v1/embeddings", {"input": TEXTS, "model": str(folder)}),
                  "openai/query_dims32": ("/v1/embeddings", {"input": TEXTS, "model": str(folder),
                                                             "prompt_name": "query", "dimensions": 32}),
                  "tei": ("/embed", {"inputs": TEXTS})}
        for name, (route, body) in bodies.items():
            r = client.post(route, json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            vecs = [d["embedding"] for d in data["data"]] if isinstance(data, dict) else data
            out[f"serve/{name}"] = sha(np.asarray(vecs, np.float64))
    return out


def train_hashes(folder: Path, tmp: Path) -> dict:
    import jax

    from embeddinggemma_jax.train import step as st
    from embeddinggemma_jax.train.run import Run, RunConfig

    rng = np.random.default_rng(1)
    pairs = tmp / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(16):
            q = " ".join(f"q{int(x)}" for x in rng.integers(0, 99, 5))
            f.write(json.dumps({"query": f"{q} {i}", "positive": f"answer {q} {i}"}) + "\n")
    tc = st.TrainConfig(matryoshka_dims=(40, 16), total_steps=2, warmup_steps=1, dtype="float32", learning_rate=1e-3)
    run = Run(RunConfig(model=str(folder), train_file=str(pairs), output_dir=str(tmp / "train"), train=tc,
                        batch_size=4, max_length=64, save_every=100, progress=False, export=False,
                        tensorboard=False))
    run.fit(say=lambda s: None)
    params = run.state["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    run.close()
    losses = [json.loads(line).get("loss") for line in (tmp / "train" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and None not in losses, losses
    out = {"train/losses": hashlib.sha256(json.dumps(losses).encode()).hexdigest(),
           "train/params": hashlib.sha256("".join(jax.tree_util.keystr(p) + sha(v) for p, v in leaves).encode())
           .hexdigest()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the hashes here (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two hash files and exit")
    ap.add_argument("--only", choices=["encode", "embed", "serve", "train"], action="append")
    a = ap.parse_args(argv)
    if a.compare:
        before, after = (json.loads(Path(p).read_text()) for p in a.compare)
        diff = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        print(f"{len(before.keys() & after.keys()) - len(diff)} equal, {len(diff)} different: {diff}")
        return 1 if diff else 0
    from embeddinggemma_jax.testing import make_tiny_folder

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        folder = make_tiny_folder(tmp / "model", seed=0)
        hashes = {}
        parts = a.only or ["encode", "embed", "serve", "train"]
        for part in parts:
            t0 = time.perf_counter()
            fn = {"encode": lambda: encode_hashes(folder), "embed": lambda: embed_hashes(folder, tmp),
                  "serve": lambda: serve_hashes(folder), "train": lambda: train_hashes(folder, tmp)}[part]
            hashes.update(fn())
            print(f"{part}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = json.dumps(hashes, indent=1, sort_keys=True)
    if a.out:
        from embeddinggemma_jax.io_utils import atomic_write_bytes

        atomic_write_bytes(a.out, (text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
