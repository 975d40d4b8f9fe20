"""``embeddinggemma-jax convert`` and ``export``: sentence-transformers folder <-> Orbax checkpoint."""

from __future__ import annotations

import time


def cmd_convert(args) -> int:
    from embeddinggemma_jax import checkpoint

    t0 = time.perf_counter()
    out = checkpoint.convert(args.model, args.output, param_dtype=args.param_dtype)
    print(f"wrote Orbax checkpoint {out} from {args.model} ({args.param_dtype} parameters, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_export(args) -> int:
    from embeddinggemma_jax import checkpoint

    t0 = time.perf_counter()
    out = checkpoint.export(args.checkpoint, args.output, dtype=args.dtype)
    print(f"wrote sentence-transformers folder {out} from {args.checkpoint} ({args.dtype}, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def add_parser(sub) -> None:
    from embeddinggemma_jax.hub import DEFAULT_MODEL

    p = sub.add_parser("convert", help="sentence-transformers folder or hub id -> Orbax checkpoint",
                       description="Convert a sentence-transformers folder (or hub id) of EmbeddingGemma into an "
                                   "Orbax checkpoint holding the parameters, config, tokenizer and prompts. "
                                   "EmbeddingGemma.from_pretrained(OUTPUT) loads it.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"source folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--output", required=True, help="checkpoint folder to write (written atomically)")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the stored parameters (default: float32, lossless)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="Orbax checkpoint -> sentence-transformers folder",
                       description="Write a complete sentence-transformers folder (model.safetensors, 2_Dense, "
                                   "3_Dense, configs, tokenizer, prompts) from an Orbax checkpoint; "
                                   "SentenceTransformer(OUTPUT) loads it.")
    p.add_argument("--checkpoint", required=True, help="Orbax checkpoint folder from `convert` (or a fine-tuning run)")
    p.add_argument("--output", required=True, help="folder to write (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the exported tensors (default: float32)")
    p.set_defaults(func=cmd_export)
