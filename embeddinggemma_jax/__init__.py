"""EmbeddingGemma-300m in JAX/Flax: text embeddings equal to the sentence-transformers reference."""

from embeddinggemma_jax.backend import keep_cpu_host_quiet

keep_cpu_host_quiet()  # before anything starts JAX's backends: no libtpu warnings on a CPU-only host

from embeddinggemma_jax.config import EncoderConfig, HeadConfig  # noqa: E402  (light: no JAX)
from embeddinggemma_jax.hub import DEFAULT_MODEL  # noqa: E402
from embeddinggemma_jax.version import __version__  # noqa: E402

__all__ = ["EmbeddingGemma", "EncoderConfig", "HeadConfig", "DEFAULT_MODEL", "__version__"]


def __getattr__(name: str):
    # EmbeddingGemma imports JAX and Flax: loaded on first use, so `embeddinggemma-jax --help` and the
    # subcommands that do not run the model stay light.
    if name == "EmbeddingGemma":
        from embeddinggemma_jax.model import EmbeddingGemma

        return EmbeddingGemma
    raise AttributeError(f"module 'embeddinggemma_jax' has no attribute {name!r}")
