"""Write a jsonl corpus of docstring-like texts for `embed --plan-only` and the job benchmarks.

Lengths follow the standard library's docstrings (this interpreter's): each record is a docstring drawn
at random (seeded), so the token-length distribution is that of real docstrings (median ~30 tokens with
the document prompt, a long tail to ~2k). Usage:

    python benchmarks/make_corpus.py OUT.jsonl [--lines 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random

from embeddinggemma_jax.bench import top_level_stdlib_docstrings


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    docs = top_level_stdlib_docstrings()
    r = random.Random(a.seed)
    with open(a.out, "w", encoding="utf-8") as f:
        for i in range(a.lines):
            f.write(json.dumps({"id": i, "text": r.choice(docs)}) + "\n")
    print(f"wrote {a.lines:,} records ({len(docs):,} distinct docstrings) to {a.out}")


if __name__ == "__main__":
    main()
