"""Benchmark code that the CLI reaches (``embeddinggemma-jax bench``, ``serve-bench``), kept apart from the
runtime package: no module outside ``embeddinggemma_jax.bench`` imports it (tests/test_packaging.py checks
the import graph), and it works from a wheel install. PyTorch and sentence-transformers (the ``st-*``
engine) run in their own process (``conversion.st_worker``) and need the ``bench`` extra.

- ``corpora``: the standard-library corpora the benchmarks embed;
- ``speed``: ``bench``, this package against sentence-transformers, side by side;
- ``serve``: ``serve-bench``, the server under load against offline encode;
- ``__main__``: the JAX engine's worker process.

The names below are re-exported for ``benchmarks/`` scripts and tests.
"""

from embeddinggemma_jax.bench.corpora import (
    iter_docstrings,
    long_documents,
    stdlib_docstrings,
    top_level_stdlib_docstrings,
)
from embeddinggemma_jax.bench.speed import best_seconds, matmul_peak_flops, model_flops, peak_rss_mb

__all__ = ["iter_docstrings", "long_documents", "stdlib_docstrings", "top_level_stdlib_docstrings", "best_seconds",
           "matmul_peak_flops", "model_flops", "peak_rss_mb"]
