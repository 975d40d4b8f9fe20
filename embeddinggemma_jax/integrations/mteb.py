"""MTEB adapter (``pip install embeddinggemma-jax[mteb]``): mteb 2.x's encoder protocol over ``EmbeddingGemma``.

    import mteb
    from embeddinggemma_jax.integrations.mteb import EmbeddingGemmaMTEB

    results = mteb.evaluate(EmbeddingGemmaMTEB("google/embeddinggemma-300m"),
                            mteb.get_tasks(tasks=["STSBenchmarkMultilingualSTS"]))

Prompts are chosen exactly as mteb's own ``google/embeddinggemma-300m`` entry chooses them (a
``SentenceTransformerEncoderWrapper`` over the model's own prompts): mteb's ``get_prompt_name`` looks the
task up among the model's prompt names (task name + prompt type, task name, task type + prompt type,
task type, prompt type), and where nothing matches, a query or document input gets the model's
``query`` or ``document`` prompt (what sentence-transformers' ``encode_query``/``encode_document`` do)
and anything else none. The texts are embedded by ``EmbeddingGemma.encode`` (the batching engine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.similarity_functions import cos_sim, pairwise_cos_sim
from mteb.types import PromptType

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata


class EmbeddingGemmaMTEB(AbsEncoder):
    """``model``: an ``EmbeddingGemma`` or anything ``EmbeddingGemma.from_pretrained`` loads (then ``dtype``,
    ``quantize`` apply). ``dimensions``: Matryoshka truncation (default: the full 768)."""

    def __init__(self, model: Any = "google/embeddinggemma-300m", *, dtype: str = "float32",
                 quantize: str | None = None, dimensions: int | None = None, batch_size: int = 32,
                 name: str | None = None, revision: str | None = None):
        from embeddinggemma_jax import EmbeddingGemma

        if not isinstance(model, EmbeddingGemma):
            name = name or str(model)
            model = EmbeddingGemma.from_pretrained(model, dtype=dtype, quantize=quantize)
        self.model = model
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.model_prompts, _ = AbsEncoder.validate_task_to_prompt_name(model.prompts, raise_for_invalid_keys=False)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name or "google/embeddinggemma-300m", revision=revision, loader=type(self),
            embed_dim=dimensions or model.dimensions, similarity_fn_name=ScoringFunction.COSINE,
            max_tokens=model.head_config.max_seq_length, framework=["JAX"], use_instructions=True))

    def prompt_for(self, task_metadata: "TaskMetadata", prompt_type: PromptType | None) -> str | None:
        """The prompt text an input of this task and prompt type gets (as mteb's EmbeddingGemma entry)."""
        name = get_prompt_name(self.model_prompts, task_metadata, prompt_type) if self.model_prompts else None
        if name is not None:
            return self.model_prompts[name]
        if prompt_type is not None:  # sentence-transformers' encode_query / encode_document defaults
            return self.model.prompts.get(PromptType(prompt_type).value)
        return None

    def encode(self, inputs, *, task_metadata: "TaskMetadata", hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts = [t for batch in inputs for t in batch["text"]]
        if not texts:
            return np.zeros((0, self.dimensions or self.model.dimensions), np.float32)
        return self.model.encode(texts, prompt=self.prompt_for(task_metadata, prompt_type) or None,
                                 dimensions=self.dimensions, batch_size=kwargs.get("batch_size") or self.batch_size)

    def similarity(self, embeddings1, embeddings2):
        """Cosine similarity matrix (the model's similarity function)."""
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Cosine similarity of each pair of rows."""
        return pairwise_cos_sim(embeddings1, embeddings2)
