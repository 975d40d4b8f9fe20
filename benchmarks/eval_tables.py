"""docs/evaluation.md's number tables, generated from the checked-in result files.

    python benchmarks/doc_tables.py [--check]   # every generated table of docs/, these included

- ``benchmarks/eval_sts_reference.json`` (``benchmarks/eval_sts_reference.py``): ours vs
  EmbeddingSimilarityEvaluator per language, scores and seconds;
- ``benchmarks/sts_recipe.json`` (``benchmarks/sts_recipe.py``), when present: the CoSENT recipe before/after.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "evaluation.md"


def reference_table(r: dict) -> str:
    lines = [f"`python benchmarks/eval_sts_reference.py --languages {','.join(r['results'])}"
             + (f" --max-pairs {r['max_pairs']}" if r.get("max_pairs") else "")
             + f" --out benchmarks/eval_sts_reference.json` ({r['split']} split, our dtype {r['dtype']}, "
             f"prompt {r['prompt_name']}, batch {r['batch_size']}; CPU: {r['cpu']}, {r['cpu_count']} cores, "
             f"load average at start {r['load_average_start'][0]:.1f}: the box was shared, so the seconds are noisy)",
             "",
             "| language | pairs | distinct sentences | evaluate sts | EmbeddingSimilarityEvaluator | difference "
             "| our seconds (compilations) | reference seconds | reference / ours |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lang, x in r["results"].items():
        lines.append(f"| {lang} | {x['pairs']} | {x['sentences']} | {x['ours']:.4f} | {x['reference']:.4f} | "
                     f"{x['difference']:+.4f} | {x['ours_seconds']:.1f} ({x['ours_compilations']}) | "
                     f"{x['reference_seconds']:.1f} | {x['reference_seconds'] / x['ours_seconds']:.2f}x |")
    return "\n".join(lines)


def speed_table(r: dict) -> str:
    """README's short form of the reference table: scores and seconds per language."""
    lines = ["| language | pairs | evaluate sts | EmbeddingSimilarityEvaluator | our seconds | reference seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for lang, x in r["results"].items():
        lines.append(f"| {lang} | {x['pairs']} | {x['ours']:.4f} | {x['reference']:.4f} | {x['ours_seconds']:.0f} | "
                     f"{x['reference_seconds']:.0f} |")
    return "\n".join(lines) + (f"\n\n({r['dtype']}, CPU {r['cpu']} x {r['cpu_count']}, shared: each row ran at its own "
                                "load, recorded in the JSON, so compare within a row; "
                                "`python benchmarks/eval_sts_reference.py --languages "
                                f"{','.join(r['results'])}" + (f" --max-pairs {r['max_pairs']}" if r.get("max_pairs")
                                                               else "") + " --out benchmarks/eval_sts_reference.json`)")


def recipe_table(r: dict) -> str:
    pairs = f"the first {r['eval_pairs']} dev pairs" if r.get("eval_pairs") else "the whole dev split"
    lines = [f"Fine-tune: {r['description']}; STS-B Spearman x 100 on {pairs} of each language, fp32, "
             f"before and after ({r['train_seconds'] / 60:.0f} min of training, {r['seconds'] / 60:.0f} min in all). "
             "Reproduce:", "",
             "```bash",
             f"python benchmarks/sts_recipe.py --languages {r['languages']} --steps {r['steps']} --batch-size "
             f"{r['batch_size']}" + (f" --eval-pairs {r['eval_pairs']}" if r.get("eval_pairs") else "")
             + " --out benchmarks/sts_recipe.json",
             "# which runs, between the evaluations:",
             f"embeddinggemma-jax evaluate sts-to-jsonl --data STSB_DIR --split train --languages {r['languages']} "
             "--out stsb-train.jsonl",
             re.sub(r"--train-file \S+", "--train-file stsb-train.jsonl", r["command"].replace(r.get("run_dir", "\0"), "RUN")),
             "```", "",
             "| language | before | after | change |", "|---|---:|---:|---:|"]
    for lang in r["before"]["results"]:
        b, a = r["before"]["results"][lang]["spearman"], r["after"]["results"][lang]["spearman"]
        lines.append(f"| {lang} | {b:.2f} | {a:.2f} | {a - b:+.2f} |")
    b, a = r["before"]["mean"], r["after"]["mean"]
    lines.append(f"| mean | {b:.2f} | {a:.2f} | {a - b:+.2f} |")
    if r.get("retrieval_before"):
        lines += ["", "| docstring retrieval (d=768) | before | after |", "|---|---:|---:|"]
        for k in ("recall@1", "mrr@10", "ndcg@10"):
            lines.append(f"| {k} | {r['retrieval_before']['768'][k]:.4f} | {r['retrieval_after']['768'][k]:.4f} |")
    return "\n".join(lines)


TABLES = {"STS_REFERENCE": ("eval_sts_reference.json", reference_table),
          "STS_RECIPE": ("sts_recipe.json", recipe_table)}


README = {"STS_SPEED": ("eval_sts_reference.json", speed_table), "STS_RECIPE": ("sts_recipe.json", recipe_table)}


def _tables(tables: dict) -> dict[str, str]:
    out = {}
    for name, (file, fn) in tables.items():
        path = ROOT / "benchmarks" / file
        out[name] = fn(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else \
            f"(no `benchmarks/{file}` yet: run the command above)"
    return out


def blocks() -> dict[str, dict[str, str]]:
    return {"evaluation.md": _tables(TABLES), "../README.md": _tables(README)}


def main(argv=None) -> int:
    import doc_tables

    return doc_tables.main(argv, blocks, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
