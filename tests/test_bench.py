"""The benchmark harness on the tiny model: corpora, report fields, and that the engines agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from embeddinggemma_jax.bench import long_documents, stdlib_docstrings
from embeddinggemma_jax.tokenize import TextTokenizer

REPO = Path(__file__).resolve().parents[1]


def test_corpora_have_the_requested_lengths(tiny_folder):
    tok = TextTokenizer(tiny_folder / "tokenizer.json", 4096)
    docs = stdlib_docstrings(tok, n=20, min_tokens=50, max_tokens=700)
    counts = tok.count(docs)
    assert len(set(docs)) == 20 and all(50 <= c <= 700 for c in counts)
    assert docs == stdlib_docstrings(tok, n=20, min_tokens=50, max_tokens=700)  # deterministic
    long = long_documents(tok, n=2, tokens=1000)
    assert len(long) == 2 and long[0] != long[1] and min(tok.count(long)) >= 1000


@pytest.mark.slow
def test_bench_command_reports_every_engine(tiny_folder):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--model", str(tiny_folder),
                          "--engines", "jax-float32,st-float32", "--docstrings", "6", "--long-docs", "1",
                          "--threads", "1", "--st-batch-size", "1", "--rounds", "2", "--json"],
                         capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["threads"] == 1 and set(r["engines"]) == {"jax-float32", "st-float32"}
    assert r["st_batch_size"] == 1 and r["batch_size"] == 32 and r["rounds"] == 2
    for e in r["engines"].values():  # each engine ran twice; the fastest round is reported
        for c in e["corpora"].values():
            assert len(c["tokens_per_s_rounds"]) == 2 and c["tokens_per_s"] == max(c["tokens_per_s_rounds"])
    jx = r["engines"]["jax-float32"]
    assert jx["max_batch_tokens"] == r["max_batch_tokens"] == 2048  # "auto" on a CPU
    assert all(rows * L <= max(2048, L) for c in jx["corpora"].values() for rows, L in c["batch_shapes"])
    for name in ("docstrings", "long"):
        c = jx["corpora"][name]
        assert c["tokens"] == r["engines"]["st-float32"]["corpora"][name]["tokens"]  # same tokens counted
        assert c["tokens_per_s"] > 0 and 0 < c["mfu"] < 1 and 0 < c["padding_efficiency"] <= 1
        assert c["buckets_compiled"] >= 1 and c["compile_s_per_bucket"] > 0
        assert c["min_cosine_vs_st"] > 0.9999  # the two engines computed the same embeddings
        st = r["engines"]["st-float32"]["corpora"][name]
        assert c["speedup_vs_st"] == pytest.approx(c["tokens_per_s"] / st["tokens_per_s"])  # the ratio it prints
    assert jx["peak_rss_mb"] > 0 and jx["first_embedding_s"] >= jx["load_s"] > 0


def test_bench_refuses_unknown_engine(tiny_folder, capsys):
    from embeddinggemma_jax.cli import main

    assert main(["bench", "--model", str(tiny_folder), "--engines", "jax-float16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown engine 'jax-float16'; choose from jax-float32" in err[0], err


def test_bench_without_sentence_transformers_says_which_extra(tiny_folder, capsys, monkeypatch):
    """From a wheel without the bench extra, the st engine is refused in one line before anything loads; the
    JAX engines alone do not need it."""
    import importlib.util

    from embeddinggemma_jax.bench import speed
    from embeddinggemma_jax.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "sentence_transformers" else real(m, *a))
    assert main(["bench", "--model", str(tiny_folder / "absent"), "--engines", "st-float32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'embeddinggemma-jax[bench]'" in err[0] and "sentence_transformers" in err[0]
    speed.check_st_installed(("jax-float32", "jax-bfloat16"))  # no st engine: nothing to refuse


def test_no_runtime_module_imports_the_benchmark_package():
    """``embeddinggemma_jax.bench`` is reached only through the CLI registry (a module name, imported when
    ``bench`` / ``serve-bench`` runs): no other module of the package imports it."""
    import ast

    pkg = REPO / "embeddinggemma_jax"
    importers = set()
    for p in pkg.rglob("*.py"):
        if (pkg / "bench") in p.parents:
            continue
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [f"{n.module}.{a.name}" for a in n.names] if isinstance(n, ast.ImportFrom) and n.module else []
            if any(x == "embeddinggemma_jax.bench" or x.startswith("embeddinggemma_jax.bench.") for x in names):
                importers.add(p.relative_to(REPO).as_posix())
    assert importers == set(), importers
    from embeddinggemma_jax.cli import COMMANDS

    assert {c.module for c in COMMANDS if c.name in ("bench", "serve-bench")} == {
        "embeddinggemma_jax.bench.speed", "embeddinggemma_jax.bench.serve"}
