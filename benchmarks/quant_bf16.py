"""Where int8 loses cosine in bf16 compute: each variant of the quantized bf16 model against fp32.

Variants (per mode): ``bf16-weights``: the float model loaded in bf16, then quantized (what
``from_pretrained(dtype="bfloat16", quantize=...)`` did: the int8 values are rounded from weights
already rounded to bf16); ``fp32-weights``: quantized from the fp32 weights, computing in bf16 (what it
does now); and the bf16 float model alone. Texts: the builtin parity cases. Results to ``--out``.

    PYTHONPATH=. python benchmarks/quant_bf16.py --out benchmarks/quant_bf16.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_recipes import RECIPES, texts_for  # noqa: E402
from embeddinggemma_jax.head import l2_normalize  # noqa: E402
from embeddinggemma_jax.io_utils import atomic_write_json  # noqa: E402
from embeddinggemma_jax.model import EmbeddingGemma  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--modes", default="int8-weights,int8")
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--variants", default="bf16 float,bf16-weights,fp32-weights",
                    help="which of: 'bf16 float', bf16-weights, fp32-weights")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    fp = EmbeddingGemma.from_pretrained(args.model)
    cases = texts_for(fp, args.long)
    texts = [t for _, t in cases]
    ref = l2_normalize(fp.encode(texts))
    del fp
    results = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else \
        {"cases": [n for n, _ in cases], "variants": {}}
    from embeddinggemma_jax import quant

    wanted = args.variants.split(",")
    variants = [("bf16 float", None, "bfloat16")] if "bf16 float" in wanted else []
    for mode in args.modes.split(","):
        if mode not in quant.MODES:  # a recipe of benchmarks/quant_recipes.py
            quant.MODES[mode] = (RECIPES[mode][0], False)
        variants += [(f"{mode} {v}", mode, "bfloat16" if v == "bf16-weights" else "float32")
                     for v in ("bf16-weights", "fp32-weights") if v in wanted]
    for name, mode, pdt in variants:
        t0 = time.perf_counter()
        model = EmbeddingGemma.from_pretrained(args.model, dtype="bfloat16", param_dtype=pdt)
        if mode:
            model = model.quantized(mode)
        cos = np.sum(l2_normalize(model.encode(texts)) * ref, axis=-1)
        del model
        results["variants"][name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                                     "worst_case": cases[int(np.argmin(cos))][0],
                                     "cosine_per_case": [float(c) for c in cos]}
        print(f"{name:28s} min {cos.min():.5f} mean {cos.mean():.5f} worst {cases[int(np.argmin(cos))][0]} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if args.out:
            atomic_write_json(Path(args.out), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
