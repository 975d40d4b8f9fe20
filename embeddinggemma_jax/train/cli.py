"""``embeddinggemma-jax train`` and ``embeddinggemma-jax train-export``."""

from __future__ import annotations

import argparse
import json
import sys

from embeddinggemma_jax.hub import DEFAULT_MODEL


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(s).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in str(s).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune on JSONL (query, positive[, negative]) pairs",
        description="Contrastive (MultipleNegativesRankingLoss) + Matryoshka fine-tuning with AdamW. Re-running "
                    "with the same --output-dir resumes from its latest checkpoint. Writes OUTPUT/metrics.jsonl, "
                    "OUTPUT/checkpoints/ and OUTPUT/final/ (a sentence-transformers folder).")
    p.add_argument("--config", help="JSON file of values for these flags (keys = flag names with underscores); "
                                    "flags given on the command line win")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model folder or hub id")
    p.add_argument("--train-file", help="JSONL training pairs")
    p.add_argument("--eval-file", help="JSONL held-out pairs for retrieval metrics")
    p.add_argument("--output-dir", help="run folder (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--query-field", default="query")
    p.add_argument("--positive-field", default="positive")
    p.add_argument("--negative-field", default="negative", help="hard-negative field; '' ignores negatives")
    p.add_argument("--query-prompt", default="query", help="prompt name for queries ('' for none)")
    p.add_argument("--document-prompt", default="document", help="prompt name for documents ('' for none)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps in total")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per micro-batch (the in-batch negatives)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text, prompt included (truncated)")
    p.add_argument("--pad-to-max-length", action="store_true", help="one padded shape (one compilation)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm clipping; 0 disables")
    p.add_argument("--matryoshka-dims", type=_ints, default=(768, 512, 256, 128))
    p.add_argument("--matryoshka-weights", type=_floats, default=None, help="default: 1 per dimension")
    p.add_argument("--scale", type=float, default=20.0, help="cosine-score scale (1 / temperature)")
    p.add_argument("--freeze-embeddings", action="store_true", help="keep the 201M-parameter embedding table fixed")
    p.add_argument("--no-remat", action="store_true", help="keep layer activations instead of recomputing them")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype (master parameters are float32)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimiser state over the fsdp axis")
    p.add_argument("--mesh", type=_ints, default=None, help="DATA,FSDP mesh shape (default: all devices on one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="0: evaluate only before and after training")
    p.add_argument("--eval-pairs", type=int, default=None, help="use the first N held-out pairs")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--eval-dims", type=_ints, default=None, help="default: the Matryoshka dims")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--no-export", action="store_true", help="do not write OUTPUT/final at the end")
    p.add_argument("--export-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this process (resume later)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("train-export", help="write a sentence-transformers folder from a training checkpoint",
                       description="Export the parameters of a run's checkpoint (default: the latest).")
    p.add_argument("run_dir", help="the run's --output-dir")
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_export)


def _apply_config_file(args) -> argparse.Namespace:
    """The JSON file's values replace flags left at their defaults (a flag given on the command line wins
    unless it equals its default)."""
    if not args.config:
        return args
    with open(args.config, encoding="utf-8") as f:
        values = {k: v for k, v in json.load(f).items() if not k.startswith("_")}  # "_comment" keys
    p = args.parser
    known = {a.dest for a in p._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{args.config} has unknown keys {unknown}; use flag names with underscores "
                         f"(e.g. batch_size)")
    for k in ("matryoshka_dims", "mesh", "eval_dims"):
        if isinstance(values.get(k), list):
            values[k] = tuple(values[k])
    if isinstance(values.get("matryoshka_weights"), list):
        values["matryoshka_weights"] = tuple(values["matryoshka_weights"])
    for k, v in values.items():
        if getattr(args, k) == p.get_default(k):
            setattr(args, k, v)
    return args


def run_config(args):
    from embeddinggemma_jax.train.data import Fields
    from embeddinggemma_jax.train.run import RunConfig
    from embeddinggemma_jax.train.step import TrainConfig

    for name in ("train_file", "output_dir"):
        if not getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    tc = TrainConfig(
        learning_rate=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps, schedule=args.schedule,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, grad_accum=args.grad_accum,
        matryoshka_dims=tuple(args.matryoshka_dims), matryoshka_weights=args.matryoshka_weights, scale=args.scale,
        freeze_embeddings=args.freeze_embeddings, remat=not args.no_remat, dtype=args.dtype, fsdp=args.fsdp,
        mesh_shape=tuple(args.mesh) if args.mesh else None, seed=args.seed)
    return RunConfig(
        model=args.model, train_file=args.train_file, output_dir=args.output_dir, train=tc,
        batch_size=args.batch_size, max_length=args.max_length, pad_to_max_length=args.pad_to_max_length,
        eval_file=args.eval_file, eval_every=args.eval_every, eval_pairs=args.eval_pairs,
        eval_batch_size=args.eval_batch_size, eval_dims=args.eval_dims, save_every=args.save_every, keep=args.keep,
        fields=Fields(args.query_field, args.positive_field, args.negative_field or None),
        query_prompt=args.query_prompt, document_prompt=args.document_prompt, export=not args.no_export,
        export_dtype=args.export_dtype, stop_after=args.stop_after, progress=not args.no_progress)


def cmd_train(args) -> int:
    from embeddinggemma_jax.train.run import Run

    args = _apply_config_file(args)
    run = Run(run_config(args))
    try:
        summary = run.fit(say=lambda s: print(s, file=sys.stderr))
    finally:
        run.close()
    json.dump(summary, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


def cmd_export(args) -> int:
    from embeddinggemma_jax.train.run import export_checkpoint

    print(export_checkpoint(args.run_dir, args.out_dir, args.step, args.dtype))
    return 0
