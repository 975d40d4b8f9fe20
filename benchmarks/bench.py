"""Side-by-side benchmark, runnable from a checkout: ``python benchmarks/bench.py [--json] ...``.

The same as ``embeddinggemma-jax bench``; see ``embeddinggemma_jax/bench/speed.py`` for what it measures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embeddinggemma_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
