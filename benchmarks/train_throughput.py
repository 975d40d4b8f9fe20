"""Training throughput on this CPU: pairs/s of this package's ``train`` step against sentence-transformers'
own training loop (``SentenceTransformerTrainer``), same pairs, same batch, same loss, one process, fp32.

    python benchmarks/train_throughput.py                      # the tiny random model (seconds)
    python benchmarks/train_throughput.py --model real --steps 6 --batch-size 8 --max-length 64

Both sides train the same model folder on the same JSONL pairs (no prompts, so both see the same tokens):
MultipleNegativesRankingLoss (scale 20, in-batch negatives; ours: ``--matryoshka-dims`` = the model's
output size alone, which is MNRL), AdamW (lr 2e-5, weight decay 0.01, no warm-up, linear decay), global
gradient-norm clipping at 1.0, float32, batch ``--batch-size`` pairs. Each side runs in its own
subprocess (one model in memory at a time), one after the other. A step's time is wall time from the
step's start to the next (ours: ``metrics.jsonl``'s ``step_seconds``, which includes reading and tokenising
the batch; theirs: a ``TrainerCallback``'s ``on_step_begin`` to ``on_step_end``, which includes collating and
tokenising); the first ``--skip`` steps (compilation, warm-up) are left out and the median of the rest is
reported. Padding differs: sentence-transformers pads a batch to its longest text, ours to a length
bucket (``TRAIN_LENGTH_BUCKETS``), as each trains by default.

Writes ``benchmarks/train_throughput.json`` (``--json`` to change): the CPU, the versions, each side's
step times and pairs/s, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    import random

    r = random.Random(seed)
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
             "upsilon phi chi psi omega").split()
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(r.choice(words) for _ in range(r.randint(4, 12)))
            d = f"document {i}: " + " ".join(r.choice(words) for _ in range(r.randint(12, 40)))
            f.write(json.dumps({"query": q, "positive": d}) + "\n")
    return path


def ours(a) -> dict:
    from embeddinggemma_jax.train import step as st
    from embeddinggemma_jax.train.run import Run, RunConfig
    from embeddinggemma_jax.source import read_source

    head = read_source(a.folder).head_config
    tc = st.TrainConfig(matryoshka_dims=(head.out_features,), total_steps=a.steps, dtype="float32",
                        learning_rate=2e-5, weight_decay=0.01, max_grad_norm=1.0)
    with tempfile.TemporaryDirectory() as out:
        rc = RunConfig(model=a.folder, train_file=a.pairs, output_dir=out, train=tc, batch_size=a.batch_size,
                       max_length=a.max_length, query_prompt="", document_prompt="", save_every=10 ** 9,
                       export=False, progress=False, tensorboard=False)
        run = Run(rc)
        try:
            run.fit(say=lambda s: None)
        finally:
            run.close()
        recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [r["step_seconds"] for r in recs if "loss" in r],
            "losses": [r["loss"] for r in recs if "loss" in r]}


def theirs(a) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    torch.manual_seed(0)
    model = SentenceTransformer(a.folder, device="cpu")
    model.max_seq_length = a.max_length
    recs = [json.loads(x) for x in Path(a.pairs).read_text().splitlines()]
    data = Dataset.from_dict({"anchor": [r["query"] for r in recs], "positive": [r["positive"] for r in recs]})
    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=2e-5,
            weight_decay=0.01, max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="linear", use_cpu=True,
            fp16=False, bf16=False, save_strategy="no", logging_steps=1, report_to="none", seed=0,
            dataloader_drop_last=True, disable_tqdm=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                             loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[Clock()])
        trainer.train()
    return {"step_seconds": times, "losses": losses}


def summarize(res: dict, batch: int, skip: int) -> dict:
    kept = res["step_seconds"][skip:] or res["step_seconds"]
    med = statistics.median(kept)
    return dict(res, median_step_seconds=med, pairs_per_second=batch / med, steps_timed=len(kept))


def table(r: dict) -> str:
    """The markdown table of a result file (docs/training.md)."""
    head = (f"{r['cpu']} ({r['cpu_count']} cores, 1-min load average {r['load_average_1min']:.1f} when measured), "
            f"model {r['model']}, batch {r['batch_size']} pairs, max length {r['max_length']}, {r['dtype']}, "
            f"median of steps {r['skip'] + 1}-{r['steps']}:")
    rows = ["| trainer | median step (s) | pairs/s |", "|---|---:|---:|"]
    for name, k in (("embeddinggemma-jax `train`", "ours"), ("sentence-transformers `SentenceTransformerTrainer`",
                                                             "sentence_transformers")):
        rows.append(f"| {name} | {r[k]['median_step_seconds']:.3f} | {r[k]['pairs_per_second']:.2f} |")
    rows.append(f"| GPU (bf16, same batch) | {r['gpu']} | |")
    return "\n".join([head, "", *rows, "", f"Ratio (ours / sentence-transformers): "
                                            f"{r['ratio_ours_over_sentence_transformers']:.2f}x."])


def blocks(path: Path = ROOT / "benchmarks" / "train_throughput.json") -> dict[str, dict[str, str]]:
    return {"training.md": {"TRAIN_THROUGHPUT": table(json.loads(path.read_text()))}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (a random tiny model), real (google/embeddinggemma-300m "
                                                    "from the cache) or a model folder")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out (compilation, warm-up)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "train_throughput.json"))
    p.add_argument("--table", action="store_true", help="print the markdown table of the --json file and stop")
    p.add_argument("--side", choices=["ours", "theirs"], help=argparse.SUPPRESS)  # a subprocess's part
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.json).read_text())))
        return 0
    if a.side:
        print(json.dumps((ours if a.side == "ours" else theirs)(a)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        if a.model == "tiny":
            from embeddinggemma_jax.testing import make_tiny_folder

            folder = make_tiny_folder(Path(tmp) / "model", seed=0)
        elif a.model == "real":
            from embeddinggemma_jax import hub

            folder, why = hub.cached(hub.DEFAULT_MODEL)
            if folder is None:
                raise SystemExit(f"real weights not available: {why}")
        else:
            folder = Path(a.model)
        pairs = write_pairs(Path(tmp) / "pairs.jsonl", a.batch_size * (a.steps + 1))
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        out = {}
        for side in ("ours", "theirs"):
            cmd = [sys.executable, __file__, "--side", side, "--folder", str(folder), "--pairs", str(pairs),
                   "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
            out[side] = summarize(json.loads(r.stdout.strip().splitlines()[-1]), a.batch_size, a.skip)
            print(f"{side}: {out[side]['pairs_per_second']:.2f} pairs/s (median step "
                  f"{out[side]['median_step_seconds'] * 1e3:.1f} ms)", file=sys.stderr)

    import jax
    import sentence_transformers
    import torch

    result = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "model": a.model, "batch_size": a.batch_size, "max_length": a.max_length, "steps": a.steps,
              "skip": a.skip, "dtype": "float32", "loss": "MultipleNegativesRankingLoss (scale 20)",
              "versions": {"jax": jax.__version__, "torch": torch.__version__,
                           "sentence_transformers": sentence_transformers.__version__},
              "ours": out["ours"], "sentence_transformers": out["theirs"],
              "ratio_ours_over_sentence_transformers": out["ours"]["pairs_per_second"] /
              out["theirs"]["pairs_per_second"],
              "gpu": "not measured: no GPU in the session that wrote this file"}
    from embeddinggemma_jax.io_utils import atomic_write_bytes

    atomic_write_bytes(a.json, (json.dumps(result, indent=1) + "\n").encode())
    print(f"ours / sentence-transformers: {result['ratio_ours_over_sentence_transformers']:.2f}x "
          f"({result['cpu']}); wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
