"""Every quantization recipe tried, measured: min / mean cosine to the fp32 model per recipe.

A recipe is a spec per parameter kind (``quant.TARGETS``: the embedding table, attention, MLP, the
Dense head; a kind left out stays float) plus, optionally, a calibration method. The texts are the
builtin parity cases (``conversion.parity.builtin_cases``) and, with ``--long``, the long texts of
the real-weights parity set (``tests/test_encoder_parity.real_texts``, 255 to 2,050 tokens). One
fp32 model is held in memory; each recipe quantizes it in turn. Results go to ``--out`` (JSON) after
every recipe; ``docs/quantization.md``'s tables are rendered from it by ``benchmarks/quant_tables.py``.

    PYTHONPATH=. python benchmarks/quant_recipes.py --recipes all --out benchmarks/quant_recipes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.parity import builtin_cases  # noqa: E402
from embeddinggemma_jax import quant  # noqa: E402
from embeddinggemma_jax.head import l2_normalize  # noqa: E402
from embeddinggemma_jax.io_utils import atomic_write_json  # noqa: E402
from embeddinggemma_jax.model import EmbeddingGemma  # noqa: E402

S = quant.Spec


def _all(spec):
    return {k: spec for k in ("embed", "attn", "mlp", "head")}


# name -> (specs per kind, description). Ablations quantize one kind and leave the rest float.
RECIPES: dict[str, tuple[dict, str]] = {
    "int4-b32-all": (_all(S(4, 32)), "int4 absmax in blocks of 32 everywhere (the old int4-weights)"),
    "int4-c-mixed-old": ({"embed": S(4, None), "attn": S(8, None), "mlp": S(4, None), "head": S(4, None)},
                         "the old mixed: int4 per channel for embed/MLP/head, int8 per channel attention"),
    "only-embed-int4-b32": ({"embed": S(4, 32)}, "ablation: only the embedding table int4 b32"),
    "only-attn-int4-b32": ({"attn": S(4, 32)}, "ablation: only attention int4 b32"),
    "only-mlp-int4-b32": ({"mlp": S(4, 32)}, "ablation: only the MLP int4 b32"),
    "only-head-int4-b32": ({"head": S(4, 32)}, "ablation: only the Dense head int4 b32"),
    "int4-b32-embed8": ({**_all(S(4, 32)), "embed": S(8, 32)}, "int4 b32, embedding table int8 b32"),
    "int4-b32-embed8-head8": ({**_all(S(4, 32)), "embed": S(8, 32), "head": S(8, 32)},
                              "int4 b32, embedding table and Dense head int8 b32"),
    "int4-b16-all": (_all(S(4, 16)), "int4 absmax in blocks of 16 everywhere"),
    "int4-mlp-a8-e8h8": ({"embed": S(8, 32), "attn": S(8, 32), "mlp": S(4, 32), "head": S(8, 32)},
                         "MLP int4 b32; attention, embedding table, Dense head int8 b32"),
    "int4-mlp-a8-e8h8-gptq": ({"embed": S(8, 32), "attn": S(8, 32), "mlp": S(4, 32), "head": S(8, 32)},
                              "as int4-mlp-a8-e8h8, GPTQ for attention, MLP and head"),
    "int4-b32-e8h8-gptq": ({**_all(S(4, 32)), "embed": S(8, 32), "head": S(8, 32)},
                           "int4 b32 attention and MLP with GPTQ; embedding table, Dense head int8 b32"),
    "int4-embed-b8": ({"embed": S(4, 32), "attn": S(8, 32), "mlp": S(8, 32), "head": S(8, 32)},
                      "int4 b32 embedding table; attention, MLP, Dense head int8 b32 (the new int4-weights)"),
    "int4-embed-c8": ({"embed": S(4, 32), "attn": S(8, None), "mlp": S(8, None), "head": S(8, None)},
                      "int4 b32 embedding table; attention, MLP, Dense head int8 per channel (the new mixed)"),
    "int8-b16-all": (_all(S(8, 16)), "int8 absmax in blocks of 16 everywhere"),
    "int8-b8-all": (_all(S(8, 8)), "int8 absmax in blocks of 8 everywhere"),
    "only-embed-int8-b16": ({"embed": S(8, 16)}, "ablation: only the embedding table int8 b16"),
    "only-attn-int8-b16": ({"attn": S(8, 16)}, "ablation: only attention int8 b16"),
    "only-mlp-int8-b16": ({"mlp": S(8, 16)}, "ablation: only the MLP int8 b16"),
    "only-head-int8-b16": ({"head": S(8, 16)}, "ablation: only the Dense head int8 b16"),
}
GPTQ = {"int4-mlp-a8-e8h8-gptq", "int4-b32-e8h8-gptq"}  # recipes calibrated with GPTQ (calibration.py)


def calibration_texts(n_sts: int = 48, n_doc: int = 24, data=Path("/work/shared/data/stsb-multi-mt")) -> list[str]:
    """STS-B train sentences (English, and a few German/Spanish/French) and standard-library docstring
    train pairs (queries with the query prompt, code with the document prompt; held-out modules
    excluded): none of the texts the cosine is measured on."""
    import csv
    import tempfile

    from train_experiments.stdlib_docstrings import build_pairs

    texts = []
    for lang, n in (("en", n_sts), ("de", n_sts // 6), ("es", n_sts // 6), ("fr", n_sts // 6)):
        with open(data / f"stsb-{lang}-train.csv", encoding="utf-8") as f:
            rows = list(csv.reader(f))[:n]
        texts += [r[0] for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        build_pairs(Path(tmp), 10)
        recs = [json.loads(x) for x in (Path(tmp) / "train.jsonl").read_text().splitlines()[:n_doc]]
    texts += ["task: search result | query: " + r["query"] for r in recs]
    texts += ["title: none | text: " + r["positive"] for r in recs]
    return texts


def texts_for(model, long: bool) -> list[tuple[str, str]]:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model.tokenizer.path))
    raw.no_truncation()
    cases = builtin_cases(lambda t: len(raw.encode(t).ids), model.head_config.max_seq_length)
    if long:
        from tests.test_encoder_parity import real_texts

        for t in real_texts(model.tokenizer):
            n = len(raw.encode(t).ids)
            if n >= 255:
                cases.append((f"parity-set {n} tokens", t))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--recipes", default="all", help="comma-separated names of RECIPES or modes, or 'all'")
    ap.add_argument("--dtype", default="float32", help="compute dtype")
    ap.add_argument("--long", action="store_true", help="add the long texts of the parity set")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")

    fp = EmbeddingGemma.from_pretrained(args.model, dtype="float32")
    cases = texts_for(fp, args.long)
    texts = [t for _, t in cases]
    ref = l2_normalize(fp.encode(texts))
    src = fp if args.dtype == "float32" else None
    results = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    key = f"{args.dtype}{'+long' if args.long else ''}"
    results.setdefault(key, {"cases": [n for n, _ in cases], "recipes": {}})
    for name in names:
        t0 = time.perf_counter()
        if name in quant.MODES:
            specs, desc = quant.MODES[name][0], f"mode {name}"
            mode = name
        else:
            specs, desc = RECIPES[name]
            mode = f"recipe:{name}"
            quant.MODES[mode] = (specs, False)
        if name in GPTQ:
            from embeddinggemma_jax import calibration
            from embeddinggemma_jax.tokenize import TextTokenizer

            tok = TextTokenizer(fp.tokenizer.path, 128, fp.tokenizer.pad_id, fp.encoder_config.eos_token_id)
            batches = [(b.ids, b.mask) for b in fp.batches(tok.encode(calibration_texts()), 32)]
            module = calibration.gptq_module(fp.module, specs, batches)
            model = EmbeddingGemma(module, fp.encoder_config, fp.head_config, fp.tokenizer, quantize=mode,
                                   max_batch_tokens=fp.max_batch_tokens)
        elif src is None:
            model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype, quantize=mode)
        else:
            model = src.quantized(mode)
        cos = np.sum(l2_normalize(model.encode(texts)) * ref, axis=-1)
        r = {"description": desc, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
             "worst_case": cases[int(np.argmin(cos))][0], "cosine_per_case": [float(c) for c in cos],
             "param_bytes": quant.param_bytes(model.module), "seconds": time.perf_counter() - t0}
        del model
        results[key]["recipes"][name] = r
        print(f"{key} {name:28s} min {r['min_cosine']:.5f} mean {r['mean_cosine']:.5f} worst {r['worst_case']} "
              f"bytes {r['param_bytes']:,} ({r['seconds']:.0f}s)", flush=True)
        if args.out:
            atomic_write_json(Path(args.out), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
