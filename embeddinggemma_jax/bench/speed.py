"""Side-by-side speed benchmark: this package (fp32, bf16) against sentence-transformers.

``embeddinggemma-jax bench`` (or ``python benchmarks/bench.py``) builds two corpora from real text,
then runs each engine in its own fresh process, pinned to the same CPUs with the same thread
count, one after another:
- ``docstrings``: Python standard-library docstrings of 50-700 tokens (mixed lengths);
- ``long``: documents of exactly 2048 tokens (the model's limit).
Per engine it reports load time, time to first embedding, peak resident memory after loading
(against the size of ``model.safetensors``) and over the whole run, and per corpus tokens/s
(real tokens: padding does not count), compile seconds per length bucket (first call of a shape
minus a steady call), padding efficiency and model FLOPs utilisation against a matmul peak
measured in the same process. The engines' embeddings are compared (cosine) so the numbers
are known to describe the same computation.

The sentence-transformers side runs ``python -m conversion.st_worker`` in its own process (the
``conversion`` package is installed with this one): PyTorch never enters this package's import
graph.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from embeddinggemma_jax.batching import parse_max_batch_tokens
from embeddinggemma_jax.bench.corpora import long_documents, stdlib_docstrings
from embeddinggemma_jax.errors import InputError

SCHEMA = 1
ENGINES = ("jax-float32", "jax-bfloat16", "st-float32")
# Tracing, lowering to StableHLO, and XLA compilation: together, what a new batch shape costs.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
ST_WORKER = "conversion.st_worker"  # run with python -m


# ----------------------------------------------------------------------------- measurements
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def best_seconds(fn, repeats: int = 3, block: bool = True) -> float:
    """Fastest of ``repeats`` timed calls of ``fn()`` after one warm-up call (which compiles);
    ``block`` waits for JAX's asynchronous results."""
    import jax

    wait = jax.block_until_ready if block else (lambda r: r)
    wait(fn())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        wait(fn())
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n x n matmul on the default device: the MFU denominator."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2.0 * n ** 3 / best_seconds(lambda: f(x, x), repeats)


def model_flops(cfg, lengths) -> float:
    """Useful model FLOPs of embedding sequences of these lengths (padding excluded)."""
    from embeddinggemma_jax.costs import flops_per_token

    return float(sum(n * flops_per_token(cfg, n) for n in lengths))


def batches_efficiency(batches) -> float:
    from embeddinggemma_jax.batching import padding_efficiency

    return padding_efficiency(sum(b.real_tokens for b in batches), sum(b.ids.size for b in batches))


def _pin_threads(threads: int) -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise ValueError(f"--threads {threads} exceeds the {len(cpus)} CPUs this process may use")
    os.sched_setaffinity(0, cpus[:threads])
    return cpus[:threads]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from embeddinggemma_jax.head import l2_normalize

    return (l2_normalize(a) * l2_normalize(b)).sum(-1)


# ----------------------------------------------------------------------------- the JAX worker
def jax_worker(model_path: str, dtype: str, corpora: dict[str, list[str]], batch_size: int, out_dir: Path,
               repeats: int = 1, max_batch_tokens: int | None | str = "auto") -> dict:
    """Runs in a fresh process: load, first embedding, then per corpus a warm-up pass (compiles)
    and ``repeats`` timed passes."""
    t_start = time.perf_counter()
    import jax

    from embeddinggemma_jax import EmbeddingGemma

    compile_log: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compile_log.append(secs) if event in COMPILE_EVENTS else None)
    t0 = time.perf_counter()
    model = EmbeddingGemma.from_pretrained(model_path, dtype=dtype, max_batch_tokens=max_batch_tokens)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    model.encode(["Hello world."])
    first_s = time.perf_counter() - t0
    rss_first = peak_rss_mb()
    res = {"engine": f"jax-{dtype}", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
           "import_s": t0 - t_start, "load_s": load_s, "first_embedding_s": first_s,
           "rss_after_load_mb": rss_loaded, "rss_after_first_embedding_mb": rss_first,
           "attention_impl": model.attention_impl, "max_batch_tokens": model.max_batch_tokens, "corpora": {}}
    for name, texts in corpora.items():
        ids = model.tokenizer.encode(texts)
        lengths = [len(t) for t in ids]
        batches = model.batches(ids, batch_size)
        # Warm-up: the first batch of each shape compiles (JAX reports trace, lowering and compile times).
        compile_s, seen = [], set()
        for b in batches:
            if b.ids.shape not in seen:
                seen.add(b.ids.shape)
                c, before = model.compile_count, sum(compile_log)
                model.embed_batch(b)
                if model.compile_count > c:
                    compile_s.append(sum(compile_log) - before)
        steady = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = np.zeros((len(ids), model.dimensions), np.float32)
            for b in batches:
                out[b.index] = model.embed_batch(b)
            steady.append(time.perf_counter() - t)
        seconds = min(steady)
        emb = out
        np.save(out_dir / f"{res['engine']}-{name}.npy", emb)
        res["corpora"][name] = {
            "texts": len(texts), "tokens": int(sum(lengths)), "seconds": seconds,
            "tokens_per_s": sum(lengths) / seconds, "model_flops": model_flops(model.encoder_config, lengths),
            "padding_efficiency": batches_efficiency(batches),
            "buckets_compiled": len(compile_s), "compile_s_total": float(sum(compile_s)),
            "compile_s_per_bucket": float(np.mean(compile_s)) if compile_s else 0.0,
            "batch_shapes": sorted({tuple(b.ids.shape) for b in batches}),
        }
    res["matmul_peak_flops"] = matmul_peak_flops(dtype)
    for c in res["corpora"].values():
        c["mfu"] = c["model_flops"] / c["seconds"] / res["matmul_peak_flops"]
    res["peak_rss_mb"] = peak_rss_mb()
    return res


# ----------------------------------------------------------------------------- orchestration
def _run_worker(cmd: list[str], threads: int, out_json: Path, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None) if "--xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "") else None
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    # Pinned before the interpreter starts, so every thread pool (XLA's, PyTorch's) sizes itself to it.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if proc.returncode != 0 or not out_json.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        # The exception line, not JAX's traceback-filtering note printed after it.
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
        raise RuntimeError(f"worker {' '.join(cmd[1:4])} failed (exit {proc.returncode}): {(errors or lines)[-1]}")
    return json.loads(out_json.read_text())


def _run_engine(engine, folder, tmp, threads, batch_size, st_batch_size, repeats, max_batch_tokens, timeout) -> dict:
    out_json = tmp / f"{engine}.json"
    out_json.unlink(missing_ok=True)
    st = engine.startswith("st-")
    if st:
        script = ["-m", ST_WORKER]
    else:
        script = ["-m", "embeddinggemma_jax.bench", "--worker"]  # bench/__main__.py
    cmd = [sys.executable, *script, engine, str(folder), str(tmp), "--threads", str(threads),
           "--batch-size", str(st_batch_size if st else batch_size), "--repeats", str(repeats)]
    if not st:  # sentence-transformers batches by batch_size alone
        cmd += ["--max-batch-tokens", str(max_batch_tokens).lower()]
    return _run_worker(cmd, threads, out_json, timeout)


def _merge_round(results: dict, res: dict) -> None:
    """Keep each corpus's fastest round; the others' tokens/s stay listed."""
    old = results.setdefault(res["engine"], res)
    for name, c in res["corpora"].items():
        rounds = old["corpora"][name].get("tokens_per_s_rounds", []) + [c["tokens_per_s"]]
        if c["tokens_per_s"] > old["corpora"][name]["tokens_per_s"]:
            old["corpora"][name] = c
        old["corpora"][name]["tokens_per_s_rounds"] = rounds


def check_st_installed(engines) -> None:
    """The ``st-*`` engines run sentence-transformers on PyTorch (``conversion.st_worker``): refuse them, before
    anything is loaded, where those are not installed (a wheel install without the ``bench`` extra)."""
    import importlib.util

    st = [e for e in engines if e.startswith("st-")]
    missing = [m for m in ("torch", "sentence_transformers") if importlib.util.find_spec(m) is None]
    if st and missing:
        raise InputError(f"the {st[0]} engine needs {' and '.join(missing)}, which this Python lacks: install the "
                         "bench extra (pip install 'embeddinggemma-jax[bench]') or pass --engines "
                         "jax-float32,jax-bfloat16")


def run(model: str, engines=ENGINES, docstrings: int = 64, long_docs: int = 4, long_tokens: int = 2048,
        threads: int | None = None, batch_size: int = 32, repeats: int = 1, timeout: float = 3600,
        max_batch_tokens: int | None | str = "auto", st_batch_size: int | None = None, rounds: int = 1) -> dict:
    from embeddinggemma_jax.batching import DEFAULT_LENGTH_BUCKETS, BatchPlanner, buckets_for, resolve_max_batch_tokens
    from embeddinggemma_jax.source import read_source

    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise ValueError(f"unknown engine {bad[0]!r}; choose from {', '.join(ENGINES)}")
    check_st_installed(engines)
    threads = threads or len(os.sched_getaffinity(0))
    src = read_source(model)
    folder, head, tok = src.folder, src.head_config, src.tokenizer()
    max_doc = min(700, head.max_seq_length)
    corpora = {}
    if docstrings:
        corpora["docstrings"] = stdlib_docstrings(tok, docstrings, min_tokens=min(50, max_doc // 2), max_tokens=max_doc)
    if long_docs:
        corpora["long"] = long_documents(tok, long_docs, min(long_tokens, head.max_seq_length))
    ids = {k: tok.encode(v) for k, v in corpora.items()}
    buckets = buckets_for(head.max_seq_length, DEFAULT_LENGTH_BUCKETS)
    cap = resolve_max_batch_tokens(max_batch_tokens)  # as the JAX workers resolve it (same backend)
    st_batch_size = st_batch_size or batch_size
    report = {"schema": SCHEMA, "model": str(folder), "threads": threads, "batch_size": batch_size,
              "st_batch_size": st_batch_size, "rounds": rounds,
              "max_batch_tokens": cap,
              "model_safetensors_mb": (folder / "model.safetensors").stat().st_size / 2 ** 20,
              "corpora": {k: {"texts": len(v), "tokens": sum(map(len, ids[k])),
                              "min_tokens": min(map(len, ids[k])), "max_tokens": max(map(len, ids[k])),
                              "padding_efficiency": batches_efficiency(
                                  BatchPlanner(buckets, batch_size, max_tokens=cap).batches(ids[k]))}
                          for k, v in corpora.items()},
              "engines": {}}
    with tempfile.TemporaryDirectory(prefix="eg-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpora.json").write_text(json.dumps(corpora))
        # Round r runs the engines in order (reversed on odd rounds): on a shared machine whose speed
        # drifts, each engine's best round is compared, not whichever engine drew the slow minutes.
        for r in range(rounds):
            for engine in (engines if r % 2 == 0 else tuple(reversed(engines))):
                _merge_round(report["engines"], _run_engine(engine, folder, tmp, threads, batch_size, st_batch_size,
                                                            repeats, max_batch_tokens, timeout))
        ref = "st-float32" if "st-float32" in engines else None
        for engine, res in report["engines"].items():
            for name, c in res["corpora"].items():
                if ref and engine != ref:
                    a, b = np.load(tmp / f"{engine}-{name}.npy"), np.load(tmp / f"{ref}-{name}.npy")
                    c["min_cosine_vs_st"] = float(_cosines(a, b).min())
                    c["speedup_vs_st"] = c["tokens_per_s"] / report["engines"][ref]["corpora"][name]["tokens_per_s"]
    return report


def format_report(r: dict) -> str:
    lines = [f"model {r['model']} (model.safetensors {r['model_safetensors_mb']:.0f} MiB), {r['threads']} threads "
             f"per engine, batch size {r['batch_size']} (sentence-transformers {r.get('st_batch_size', r['batch_size'])}), "
             f"JAX batches capped at {r.get('max_batch_tokens') or 'no'} tokens"]
    for name, c in r["corpora"].items():
        lines.append(f"corpus {name}: {c['texts']} texts, {c['tokens']} tokens ({c['min_tokens']}-{c['max_tokens']} "
                     f"per text), padding efficiency {c['padding_efficiency']:.1%}")
    lines.append("")
    hdr = f"{'engine':<14}{'corpus':<12}{'tokens/s':>10}{'vs ST':>8}{'MFU':>8}{'compile s/bucket':>18}{'min cos':>10}"
    lines.append(hdr)
    for engine, e in r["engines"].items():
        for name, c in e["corpora"].items():
            sp = f"{c['speedup_vs_st']:.2f}x" if "speedup_vs_st" in c else "-"
            cb = f"{c['compile_s_per_bucket']:.1f} ({c['buckets_compiled']})" if "compile_s_per_bucket" in c else "-"
            mfu = f"{c['mfu']:.1%}" if "mfu" in c else "-"
            cos = f"{c['min_cosine_vs_st']:.5f}" if "min_cosine_vs_st" in c else "-"
            lines.append(f"{engine:<14}{name:<12}{c['tokens_per_s']:>10.1f}{sp:>8}{mfu:>8}{cb:>18}{cos:>10}")
    lines.append("")
    size = r["model_safetensors_mb"]
    for engine, e in r["engines"].items():
        lines.append(f"{engine:<14} load {e['load_s']:.1f} s, first embedding {e['first_embedding_s']:.1f} s after "
                     f"load start; peak RSS after first embedding {e['rss_after_first_embedding_mb']:.0f} MiB "
                     f"({e['rss_after_first_embedding_mb'] / size:.2f}x model.safetensors), whole run "
                     f"{e['peak_rss_mb']:.0f} MiB"
                     + (f"; matmul peak {e['matmul_peak_flops'] / 1e9:.0f} GFLOP/s" if "matmul_peak_flops" in e else ""))
    return "\n".join(lines)


BENCH_DESCRIPTION = ("Embed standard-library docstrings (50-700 tokens) and 2048-token documents with this package "
                     "(fp32, bf16) and sentence-transformers (fp32), each in a fresh process with the same threads; "
                     "print tokens/s, the ratio, compile time, peak memory, padding efficiency and MFU.")


def add_bench_arguments(p) -> None:
    from embeddinggemma_jax.hub import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    p.add_argument("--docstrings", type=int, default=64, help="docstrings in the mixed-length corpus (default 64; "
                                                              "the full corpus is 256; 0 skips it)")
    p.add_argument("--long-docs", type=int, default=4, help="2048-token documents (default 4; 0 skips them)")
    p.add_argument("--long-tokens", type=int, default=2048, help="length of the long documents (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="CPUs per engine (default: all this process may use)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="timed passes per corpus; the fastest counts (default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine this many times, alternating the order; each engine's fastest round "
                        "counts (default 1)")
    p.add_argument("--st-batch-size", type=int, default=None,
                   help="sentence-transformers' batch size (default: --batch-size); on a CPU it is fastest at 1")
    p.add_argument("--max-batch-tokens", type=parse_max_batch_tokens, default="auto",
                   help="cap on rows x length of a JAX batch: 'auto' (2048 on CPU, none on accelerators; "
                        "the package default), 'none', or a number")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def cmd_bench(args) -> int:
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if args.st_batch_size is not None and args.st_batch_size < 1:
        raise ValueError("--st-batch-size must be positive")
    positive = ("batch_size", "repeats", "rounds")
    for name in ("docstrings", "long_docs") + positive:
        if getattr(args, name) < (1 if name in positive else 0):
            raise ValueError(f"--{name.replace('_', '-')} must be {'positive' if name in positive else '>= 0'}")
    report = run(args.model, engines, args.docstrings, args.long_docs, args.long_tokens, args.threads,
                 args.batch_size, args.repeats, max_batch_tokens=args.max_batch_tokens,
                 st_batch_size=args.st_batch_size, rounds=args.rounds)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def worker_main(argv: list[str]) -> int:
    """``python -m embeddinggemma_jax.bench --worker ENGINE MODEL DIR ...``: one engine, fresh process."""
    p = argparse.ArgumentParser(prog="embeddinggemma_jax.bench --worker")
    p.add_argument("engine")
    p.add_argument("model")
    p.add_argument("dir", type=Path)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-batch-tokens", type=parse_max_batch_tokens, default="auto")
    a = p.parse_args(argv)
    _pin_threads(a.threads)
    corpora = json.loads((a.dir / "corpora.json").read_text())
    res = jax_worker(a.model, a.engine.split("-", 1)[1], corpora, a.batch_size, a.dir, a.repeats, a.max_batch_tokens)
    res["threads"] = a.threads
    tmp = a.dir / f".{a.engine}.json.tmp"
    tmp.write_text(json.dumps(res))
    os.replace(tmp, a.dir / f"{a.engine}.json")
    return 0
