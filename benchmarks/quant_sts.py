"""STS-B dev Spearman per quantization mode and compute dtype, beside fp32: run, collect, render.

Runs ``embeddinggemma-jax evaluate sts`` (the evaluation command of issue 22) once per mode x dtype,
each writing its own JSON ({"task": "sts", "split": ..., "model": ..., "results": {"en": {"spearman":
..., "pairs": ..., "by_dimension": {...}}, ...}, "mean": ...}) under ``--results``; collects them into
``benchmarks/quant_sts.json`` and renders the table between ``<!-- QUANT_STS -->`` markers of
docs/quantization.md: Spearman x 100 per language and the change from fp32 (fp32 compute, float
model) in points, with the issue's gate (every mode within 0.5 points of fp32 on every language)
marked per row.

    PYTHONPATH=. python benchmarks/quant_sts.py --run --data /work/shared/data/stsb-multi-mt   # slow: 10 runs
    PYTHONPATH=. python benchmarks/quant_sts.py            # collect + render from --results
    PYTHONPATH=. python benchmarks/quant_sts.py --check    # exit 1 if the docs table is stale
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embeddinggemma_jax.io_utils import atomic_write_json  # noqa: E402
from embeddinggemma_jax.quant import MODE_NAMES  # noqa: E402
from doc_tables import sync  # noqa: E402

DTYPES = ("float32", "bfloat16")
GATE_POINTS = 0.5  # the bar: within 0.5 Spearman points of fp32 on every language
DOC = ROOT / "docs" / "quantization.md"
OUT = ROOT / "benchmarks" / "quant_sts.json"


def runs() -> list[tuple[str, str | None]]:
    return [(d, m) for d in DTYPES for m in (None, *MODE_NAMES)]


def name(dtype: str, mode: str | None) -> str:
    return f"{mode or 'float'}-{dtype}"


def run_all(args) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for dtype, mode in runs():
        out = results / f"{name(dtype, mode)}.json"
        if out.exists() and not args.force:
            continue
        cmd = ["embeddinggemma-jax", "evaluate", "sts", "--model", args.model, "--data", args.data, "--split",
               args.split, "--languages", args.languages, "--dtype", dtype, "--json", str(out)]
        if args.max_pairs:
            cmd += ["--max-pairs", str(args.max_pairs)]
        if mode:
            cmd += ["--quantize", mode]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def collect(results: Path) -> dict:
    rows, max_pairs = {}, set()
    for dtype, mode in runs():
        p = results / f"{name(dtype, mode)}.json"
        if p.exists():
            r = json.loads(p.read_text())
            max_pairs.add(r.get("max_pairs"))
            rows[name(dtype, mode)] = {"dtype": dtype, "mode": mode, "split": r["split"], "model": r["model"],
                                       "spearman": {k: v["spearman"] for k, v in r["results"].items()},
                                       "pairs": {k: v["pairs"] for k, v in r["results"].items()}, "mean": r["mean"]}
    if len(max_pairs) > 1:
        raise SystemExit(f"the runs in {results} used different --max-pairs ({sorted(map(str, max_pairs))}): rerun")
    mp = max_pairs.pop() if max_pairs else None
    return {"command": "embeddinggemma-jax evaluate sts --split dev" + (f" --max-pairs {mp}" if mp else ""),
            "max_pairs": mp, "runs": rows}


def table(data: dict) -> str:
    rows = data.get("runs") or {}
    base = rows.get(name("float32", None))
    if not base:
        return ("*Pending: no `evaluate sts` results yet (the evaluation command of issue 22 is not merged on this "
                "branch). `python benchmarks/quant_sts.py --run --data DIR` produces them.*")
    langs = sorted(base["spearman"])
    pairs = base["pairs"]
    note = (f"STS-B dev, the first {data['max_pairs']} pairs of each language (" if data.get("max_pairs") else
            "STS-B dev, every pair (") + ", ".join(f"{lang} {pairs[lang]}" for lang in langs) + \
        "); Spearman x 100 and, in brackets, the change from float32 in points.\n\n"
    head = "| mode | compute | " + " | ".join(langs) + " | worst change | within 0.5 points |"
    lines = [head, "|" + "---|" * (len(langs) + 4)]
    for key, r in rows.items():
        deltas = [r["spearman"][lang] - base["spearman"][lang] for lang in langs]
        cells = [f"{r['spearman'][lang]:.2f} ({d:+.2f})" for lang, d in zip(langs, deltas)]  # already x 100
        worst = min(deltas)
        lines.append(f"| {r['mode'] or 'float'} | {r['dtype']} | " + " | ".join(cells)
                     + f" | {worst:+.2f} | {'yes' if worst >= -GATE_POINTS else '**no**'} |")
    return note + "\n".join(lines)


def blocks() -> dict[str, dict[str, str]]:
    return {"quantization.md": {"QUANT_STS": table(json.loads(OUT.read_text()) if OUT.exists() else {})}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run the evaluations missing from --results first")
    ap.add_argument("--force", action="store_true", help="with --run: rerun those already there")
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--data", default="/work/shared/data/stsb-multi-mt")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--languages", default="all")
    ap.add_argument("--max-pairs", type=int, default=None, help="each language's first N pairs (default: all)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "quant_sts"), help="folder of the per-run JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/quantization.md's table is stale")
    args = ap.parse_args(argv)
    if args.run:
        run_all(args)
    if not args.check and Path(args.results).is_dir():
        atomic_write_json(OUT, collect(Path(args.results)))
    stale = sync(blocks(), args.check)
    print(("stale: " if args.check and stale else "ok: ") + str(DOC.relative_to(ROOT)))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
