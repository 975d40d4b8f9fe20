"""Fine-tune EmbeddingGemma on Python standard-library docstring -> code pairs and measure retrieval.

Pairs: for every function or method of the standard library with a docstring, the query is the
docstring's summary line and the document is the function's source with the docstring removed.
The split is by module (a stable hash of the module name), so evaluation modules are never seen
in training. Retrieval: each evaluation query against all evaluation documents, at 768 and 128
dimensions, before and after fine-tuning.

    flock /tmp/real.lock env PYTHONPATH=. python train_experiments/stdlib_docstrings.py \
        --out /tmp/stdlib-run --steps 24 --batch-size 16 --max-length 128 --eval-pairs 200

Writes OUT/{train,eval}.jsonl, OUT/run/ (checkpoints, metrics.jsonl, final/) and OUT/report.json.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import random
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "ensurepip", "turtledemo",
             "lib2to3", "tkinter", "__phello__"}


def stdlib_files(root: Path):
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("test") for part in rel.parts):
            continue
        yield ".".join(rel.with_suffix("").parts).removesuffix(".__init__"), p


def pairs_of(module: str, path: Path):
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = src.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or not isinstance(node.body[0], ast.Expr):
            continue
        summary = doc.strip().splitlines()[0].strip()
        if len(summary.split()) < 4:
            continue
        d = node.body[0]
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        kept = lines[start:d.lineno - 1] + lines[d.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip()
        if code.count("\n") < 2:  # a signature and one line: too little to retrieve by
            continue
        yield {"query": summary, "positive": code, "module": module}


def is_eval_module(module: str, fraction: float = 0.15) -> bool:
    top = module.split(".")[0]  # a package and its submodules land on the same side
    return int(hashlib.sha256(top.encode()).hexdigest(), 16) % 1000 < fraction * 1000


def build_pairs(out: Path, eval_pairs: int, seed: int = 0) -> dict:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, evals, seen = [], [], set()
    for module, path in stdlib_files(root):
        for rec in pairs_of(module, path):
            if rec["query"] in seen:  # a duplicated summary would make retrieval ambiguous
                continue
            seen.add(rec["query"])
            (evals if is_eval_module(module) else train).append(rec)
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(evals)
    evals = evals[:eval_pairs]
    for name, recs in (("train", train), ("eval", evals)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    overlap = {r["module"].split(".")[0] for r in train} & {r["module"].split(".")[0] for r in evals}
    assert not overlap, overlap
    return {"stdlib": str(root), "python": sys.version.split()[0], "train_pairs": len(train),
            "eval_pairs": len(evals), "train_modules": len({r["module"] for r in train}),
            "eval_modules": len({r["module"] for r in evals})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-pairs", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dims", default="768,512,256,128", help="Matryoshka training dims")
    ap.add_argument("--eval-dims", default="768,128")
    ap.add_argument("--deadline", default=None,
                    help="HH:MM (local time): stop training in time to evaluate and export by then")
    ap.add_argument("--reserve-seconds", type=float, default=300, help="time kept for the final eval and export")
    args = ap.parse_args(argv)

    from embeddinggemma_jax.train.eval import format_metrics
    from embeddinggemma_jax.train.run import Run, RunConfig
    from embeddinggemma_jax.train.step import TrainConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = build_pairs(out, args.eval_pairs)
    print(json.dumps(data), file=sys.stderr)
    tc = TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
                     matryoshka_dims=tuple(int(x) for x in args.dims.split(",")), freeze_embeddings=True, remat=True, dtype=args.dtype)
    rc = RunConfig(model=args.model, train_file=str(out / "train.jsonl"), eval_file=str(out / "eval.jsonl"),
                   output_dir=str(out / "run"), train=tc, batch_size=args.batch_size, max_length=args.max_length,
                   eval_dims=tuple(int(x) for x in args.eval_dims.split(",")), save_every=args.steps, keep=1, export=True)
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        lt = time.localtime()
        end = time.mktime(lt[:3] + (hh, mm, 0) + lt[6:])
        rc = dataclasses.replace(rc, deadline=end - args.reserve_seconds)
    t1 = time.time()
    run = Run(rc)
    t_load = time.time() - t1
    try:
        summary = run.fit(say=lambda s: print(s, file=sys.stderr))
        if summary["eval_after"] is None:  # stopped by the deadline: measure where it got to
            summary["eval_after"] = run.evaluate()
            print(f"eval @ step {run.step}: {format_metrics(summary['eval_after'])}", file=sys.stderr)
            summary["exported"] = str(run.export(out / "run" / "final"))
        summary["steps_done"] = run.step
    finally:
        run.close()
    evals = [json.loads(line) for line in open(out / "run" / "metrics.jsonl") if '"eval"' in line]
    report = {"data": data, "config": {k: v for k, v in vars(args).items()}, "load_seconds": t_load,
              "eval_seconds": [e["eval_seconds"] for e in evals], "train_seconds": summary["train_seconds"],
              "total_seconds": time.time() - t0, "before": summary["eval_before"], "after": summary["eval_after"],
              "steps_done": summary["steps_done"], "exported": summary.get("exported")}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
