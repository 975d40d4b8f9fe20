"""The tables of docs/quantization.md, generated from the checked-in results.

- QUANT_MODES: each mode's recipe (``quant.MODES``) and parameter bytes for the real model's config
  (``quant.param_bytes`` of the abstract module: int4 counted packed, scales included);
- QUANT_TRIED: every recipe ``benchmarks/quant_recipes.py`` measured (benchmarks/quant_recipes.json),
  with its min / mean cosine to the fp32 model and its worst text;
- QUANT_BF16: the int8 modes in bf16 compute (benchmarks/quant_bf16.py -> benchmarks/quant_bf16.json).

    PYTHONPATH=. python benchmarks/quant_tables.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embeddinggemma_jax import quant  # noqa: E402

DOC = ROOT / "docs" / "quantization.md"
KINDS = ("embed", "attn", "mlp", "head")


def spec_text(spec) -> str:
    if spec is None:
        return "float"
    return f"int{spec.bits} " + (f"b{spec.block}" if spec.block else "per channel")


def modes_table() -> str:
    from embeddinggemma_jax.head import abstract_module
    from embeddinggemma_jax.hub import DEFAULT_MODEL
    from embeddinggemma_jax.source import read_source

    src = read_source(DEFAULT_MODEL)
    enc, head = src.encoder_config, src.head_config
    fp = quant.param_bytes(abstract_module(enc, head))
    lines = ["| mode | embedding table | attention | MLP | Dense head | activations | parameter bytes |",
             "|---|---|---|---|---|---|---|", f"| (float32) | float | float | float | float | float | {fp:,} (1.00) |"]
    for mode, (specs, act) in quant.MODES.items():
        b = quant.param_bytes(abstract_module(enc, head, quantize=mode))
        lines.append(f"| `{mode}` | " + " | ".join(spec_text(specs.get(k)) for k in KINDS)
                     + f" | {'int8 per token (attention, MLP)' if act else 'float'} | {b:,} ({b / fp:.2f}) |")
    return "\n".join(lines)


def tried_table(data: dict) -> str:
    lines = []
    for key, block in data.items():
        n = len(block["cases"])
        lines += [f"Texts: {key} ({n} texts{', builtin parity cases + the long parity-set texts' if 'long' in key else ', builtin parity cases'}).",
                  "", "| recipe | what | parameter bytes | min cosine | mean cosine | worst text |", "|---|---|---|---|---|---|"]
        for name, r in block["recipes"].items():
            lines.append(f"| {name} | {r['description']} | {r['param_bytes']:,} | {r['min_cosine']:.5f} | "
                         f"{r['mean_cosine']:.5f} | {r['worst_case']} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def bf16_table(data: dict) -> str:
    lines = ["| variant (bf16 compute) | min cosine | mean cosine | worst text |", "|---|---|---|---|"]
    for name, r in data.get("variants", {}).items():
        lines.append(f"| {name} | {r['min_cosine']:.5f} | {r['mean_cosine']:.5f} | {r['worst_case']} |")
    return "\n".join(lines)


def blocks() -> dict[str, dict[str, str]]:
    def load(name):
        p = ROOT / "benchmarks" / name
        return json.loads(p.read_text()) if p.exists() else {}

    return {"quantization.md": {"QUANT_MODES": modes_table(), "QUANT_TRIED": tried_table(load("quant_recipes.json")),
                                "QUANT_BF16": bf16_table(load("quant_bf16.json")),
                                "QUANT_LONG": tried_table(load("quant_long.json"))}}


def main(argv=None) -> int:
    import doc_tables

    return doc_tables.main(argv, blocks, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
