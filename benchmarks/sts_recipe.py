"""The CoSENT recipe: fine-tune on STS-B train, evaluate STS-B dev and the docstring retrieval before/after.

    python benchmarks/sts_recipe.py --languages en,de,ja --steps 40 --batch-size 16 --out benchmarks/sts_recipe.json

1. ``evaluate sts-to-jsonl``'s conversion of the train split of ``--languages`` (``eval.cli``);
2. ``evaluate sts`` on the dev split (``--eval-pairs`` first pairs of each language, all by default) and the
   standard-library docstring retrieval of ``benchmarks/quant_quality.py`` (``--retrieval-pairs`` pairs, query
   and document prompts) on the base model;
3. ``train --loss cosent --score-field score --query-prompt STS --document-prompt STS`` for ``--steps`` steps;
4. the same evaluations on ``OUTPUT/final``.

Writes the JSON after each phase (with the loss curve of the run); ``benchmarks/eval_tables.py`` turns it into
docs/evaluation.md's table, ``benchmarks/doc_charts.py`` the curve into docs/img/fine-tuning-curve.svg.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "stsb-multi-mt"


def evaluate(model_path: str, args, docstring_records) -> tuple[dict, dict]:
    from embeddinggemma_jax import EmbeddingGemma
    from embeddinggemma_jax.eval import retrieval, sts

    model = EmbeddingGemma.from_pretrained(model_path, dtype="float32")
    s = sts.run_sts(sts.model_embedder(model, "STS"), args.data, "dev", args.languages, (768, 128),
                    args.eval_pairs, say=print)

    def embed(texts, prompt_name):
        return model.encode(texts, prompt_name=prompt_name, normalize=False)

    r = retrieval.run_retrieval(embed, docstring_records, (768, 128))
    print(retrieval.format_metrics(r["by_dimension"]), flush=True)
    return s, r["by_dimension"]


def curve(run_dir: Path) -> list[dict]:
    """The run's logged training steps (``metrics.jsonl``): step, loss, learning rate; docs/img's chart."""
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{"step": r["step"], "loss": r["loss"], "lr": r.get("lr")} for r in recs if "loss" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--languages", default="en,de,ja")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--eval-pairs", type=int, default=None, help="first N dev pairs per language (default: all)")
    ap.add_argument("--retrieval-pairs", type=int, default=200)
    ap.add_argument("--run-dir", default=None, help="training folder (default: a temporary one)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from embeddinggemma_jax import hub
    from embeddinggemma_jax.io_utils import atomic_write_json
    from train_experiments.stdlib_docstrings import build_pairs

    tmp = Path(tempfile.mkdtemp(prefix="sts-recipe-"))
    build_pairs(tmp, args.retrieval_pairs)
    docs = [(r["query"], r["positive"]) for r in map(json.loads, (tmp / "eval.jsonl").read_text().splitlines())]
    train_file = tmp / "stsb-train.jsonl"
    cli = [sys.executable, "-m", "embeddinggemma_jax.cli"]
    subprocess.run(cli + ["evaluate", "sts-to-jsonl", "--data", args.data, "--split", "train", "--languages",
                          args.languages, "--out", str(train_file)], check=True)
    run_dir = Path(args.run_dir or tmp / "run")
    train_cmd = ["train", "--model", args.model, "--train-file", str(train_file), "--output-dir", str(run_dir),
                 "--loss", "cosent", "--score-field", "score", "--query-prompt", "STS", "--document-prompt", "STS",
                 "--steps", str(args.steps), "--warmup-steps", str(max(1, args.steps // 10)), "--lr", str(args.lr),
                 "--batch-size", str(args.batch_size), "--max-length", "96", "--save-every", str(args.steps),
                 "--no-progress"]
    out = {"description": f"CoSENT, {args.steps} steps of {args.batch_size} pairs from the STS-B train split of "
                          f"{args.languages} (lr {args.lr}, bf16 compute), on a CPU",
           "command": "embeddinggemma-jax " + " ".join(train_cmd), "languages": args.languages,
           "eval_pairs": args.eval_pairs, "retrieval_pairs": len(docs), "steps": args.steps,
           "batch_size": args.batch_size, "run_dir": str(run_dir)}
    t0 = time.time()
    out["before"], out["retrieval_before"] = evaluate(str(hub.resolve(args.model)), args, docs)
    atomic_write_json(Path(args.out), out)
    t1 = time.time()
    subprocess.run(cli + train_cmd, check=True)
    out["train_seconds"] = time.time() - t1
    out["curve"] = curve(run_dir)
    out["after"], out["retrieval_after"] = evaluate(str(run_dir / "final"), args, docs)
    out["seconds"] = time.time() - t0
    atomic_write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
