"""``python -m embeddinggemma_jax.bench --worker ENGINE MODEL DIR ...``: one JAX engine of ``bench`` in a
fresh process (``speed.worker_main``)."""

import sys

from embeddinggemma_jax.bench.speed import worker_main

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("use `embeddinggemma-jax bench` (or benchmarks/bench.py)")
