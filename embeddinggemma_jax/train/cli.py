"""``embeddinggemma-jax train`` and ``embeddinggemma-jax train-export``.

The flags are derived from ``RunConfig`` (and the ``TrainConfig`` and ``Fields`` inside it) by
``options``; a ``--config`` JSON file holds the same settings under the flag names with underscores.
"""

from __future__ import annotations

import json
import sys

from embeddinggemma_jax import options
from embeddinggemma_jax.train.run import RunConfig

TRAIN_DESCRIPTION = ("Contrastive (MultipleNegativesRankingLoss) + Matryoshka fine-tuning with AdamW. Re-running with "
                     "the same --output-dir resumes from its latest checkpoint. Writes OUTPUT/metrics.jsonl, "
                     "OUTPUT/checkpoints/ and OUTPUT/final/ (a sentence-transformers folder). Settings come from the "
                     "defaults, then --config, then the flags given.")


def add_train_arguments(p) -> None:
    p.add_argument("--config", help="JSON file of settings (keys: these flags' names with underscores); "
                                    "flags given on the command line win")
    options.add_arguments(p, RunConfig)


def add_export_arguments(p) -> None:
    p.add_argument("run_dir", help="the run's --output-dir")
    p.add_argument("out_dir", help="folder to write (refused if it holds anything but a folder this package wrote)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def run_config(args) -> RunConfig:
    """Defaults, then the --config file, then the flags given on the command line."""
    config = options.read_config(args.config, RunConfig) if getattr(args, "config", None) else None
    return options.build(RunConfig, args, config)


def cmd_train(args) -> int:
    from embeddinggemma_jax.io_utils import stdout_for_one_document
    from embeddinggemma_jax.train.run import Run

    with stdout_for_one_document() as document:  # stdout: the JSON summary alone (Gloo prints to fd 1)
        run = Run(run_config(args))
        try:
            summary = run.fit(say=lambda s: print(s, file=sys.stderr))
        finally:
            run.close()
        document.append(json.dumps(summary, default=str))
    return 0


def cmd_export(args) -> int:
    from embeddinggemma_jax.train.run import export_checkpoint

    print(export_checkpoint(args.run_dir, args.out_dir, args.step, args.dtype))
    return 0
