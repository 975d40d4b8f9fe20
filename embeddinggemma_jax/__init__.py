"""EmbeddingGemma-300m in JAX/Flax: text embeddings equal to the sentence-transformers reference."""

from embeddinggemma_jax.backend import keep_cpu_host_quiet

keep_cpu_host_quiet()  # before anything starts JAX's backends: no libtpu warnings on a CPU-only host

from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.hub import DEFAULT_MODEL
from embeddinggemma_jax.model import EmbeddingGemma

__all__ = ["EmbeddingGemma", "EncoderConfig", "HeadConfig", "DEFAULT_MODEL"]
__version__ = "0.1.0"
