"""``embeddinggemma-jax convert`` and ``export``: sentence-transformers folder <-> Orbax checkpoint.

``convert`` loads any model ``EmbeddingGemma.from_pretrained`` takes and writes its Orbax checkpoint
(``checkpoint.save_checkpoint``); ``export`` restores a checkpoint's parameters and writes a complete
sentence-transformers folder (``export.save_folder``). Both write atomically and refuse to replace
a folder that is not of the kind they write.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from embeddinggemma_jax.hub import DEFAULT_MODEL

CONVERT_DESCRIPTION = ("Convert a sentence-transformers folder (or hub id) of EmbeddingGemma into an Orbax checkpoint "
                       "holding the parameters, config, tokenizer and prompts. EmbeddingGemma.from_pretrained(OUTPUT) "
                       "loads it.")
EXPORT_DESCRIPTION = ("Write a complete sentence-transformers folder (model.safetensors, 2_Dense, 3_Dense, configs, "
                      "tokenizer, prompts) from an Orbax checkpoint; SentenceTransformer(OUTPUT) loads it.")


def convert(name_or_path: str | os.PathLike, out_dir: str | os.PathLike, param_dtype: str = "float32",
            quantize: str | None = None) -> Path:
    """A sentence-transformers folder (or hub id, or checkpoint) -> an Orbax checkpoint folder. With
    ``quantize`` the checkpoint holds that mode's integer weights and scales (``quant``)."""
    from embeddinggemma_jax import EmbeddingGemma, hub
    from embeddinggemma_jax.config import check_dtype

    src = hub.resolve(name_or_path)
    if Path(out_dir).resolve() == src.resolve():
        raise ValueError(f"--output {out_dir} is the source folder itself; choose a new folder")
    model = EmbeddingGemma.from_pretrained(src, dtype="float32", param_dtype=check_dtype(param_dtype),
                                           quantize=quantize)
    return model.save_checkpoint(out_dir)


def export(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """An Orbax checkpoint -> a complete sentence-transformers folder. A quantized checkpoint
    (``convert --quantize``) is written dequantized (``quant.dequantize_module``: float tensors
    holding the values of its integers and scales)."""
    from flax import nnx

    from embeddinggemma_jax import checkpoint
    from embeddinggemma_jax.config import check_dtype
    from embeddinggemma_jax.export import save_folder
    from embeddinggemma_jax.head import abstract_module

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    dtype = check_dtype(dtype)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--output {out_dir} is the checkpoint itself; choose a new folder")
    enc, head, hf_config = checkpoint.read_checkpoint_configs(checkpoint_dir)
    # fp32 restore is exact for fp32 and bf16 checkpoints alike; save_folder casts to ``dtype``.
    mode = checkpoint.read_marker(checkpoint_dir).get("quantize")
    graphdef, abstract = nnx.split(abstract_module(enc, head, "float32", "float32", quantize=mode))
    state = checkpoint.restore_state(checkpoint_dir, abstract)
    if mode is not None:
        from embeddinggemma_jax.quant import dequantize_module

        _, state = nnx.split(dequantize_module(nnx.merge(graphdef, state)))
    return save_folder(out_dir, state, enc, head, checkpoint_dir / checkpoint.ASSETS_DIR, dtype=dtype,
                       hf_config=hf_config)


def cmd_convert(args) -> int:
    t0 = time.perf_counter()
    out = convert(args.model, args.output, param_dtype=args.param_dtype, quantize=args.quantize)
    print(f"wrote Orbax checkpoint {out} from {args.model} ({args.param_dtype} parameters"
          + (f", quantized {args.quantize}" if args.quantize else "") + ", "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_export(args) -> int:
    t0 = time.perf_counter()
    from embeddinggemma_jax import checkpoint

    out = export(args.checkpoint, args.output, dtype=args.dtype)
    mode = checkpoint.read_marker(Path(args.checkpoint)).get("quantize")
    print(f"wrote sentence-transformers folder {out} from {args.checkpoint} ({args.dtype}"
          + (f", dequantized from {mode}: float tensors with the quantization error, at float size" if mode else "")
          + f", {time.perf_counter() - t0:.1f} s)")
    return 0


def add_convert_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"source folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--output", required=True, help="checkpoint folder to write (written atomically)")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the stored parameters (default: float32, lossless)")
    from embeddinggemma_jax.quant import MODE_NAMES

    p.add_argument("--quantize", default=None, choices=MODE_NAMES,
                   help="store that mode's integer weights and scales (default: none); loads quantized")


def add_export_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="Orbax checkpoint folder from `convert` (or a fine-tuning run)")
    p.add_argument("--output", required=True, help="folder to write (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the exported tensors (default: float32)")
