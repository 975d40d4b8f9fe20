"""The MTEB adapter (``integrations.mteb``) against mteb's own sentence-transformers wrapper, offline on
mteb's bundled mock tasks: the same embeddings for every encode call (so the same prompt per task
and prompt type) and the same scores."""

from __future__ import annotations

import numpy as np
import pytest

import mteb  # noqa: E402 - the test extra installs it


def _tasks():
    from mteb.mocks.mock_tasks import MockClassificationTask, MockRetrievalTask, MockSTSTask

    return [MockSTSTask(), MockRetrievalTask(), MockClassificationTask()]


def _recording(cls):
    class Recording(cls):
        calls: list

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kw):
            out = super().encode(inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                                 prompt_type=prompt_type, **kw)
            self.calls.append((task_metadata.name, None if prompt_type is None else prompt_type.value,
                               np.asarray(out, np.float32)))
            return out
    return Recording


def _compare(ours_model, st_model):
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    from embeddinggemma_jax.integrations.mteb import EmbeddingGemmaMTEB

    ours = _recording(EmbeddingGemmaMTEB)(ours_model)
    ref = _recording(SentenceTransformerEncoderWrapper)(st_model)
    ours.calls, ref.calls = [], []
    a = mteb.evaluate(ours, _tasks(), cache=None, show_progress_bar=False)
    b = mteb.evaluate(ref, _tasks(), cache=None, show_progress_bar=False)
    assert [c[:2] for c in ours.calls] == [c[:2] for c in ref.calls] and len(ours.calls) >= 4
    assert {c[1] for c in ours.calls} >= {"query", "document"}
    for (task, kind, x), (_, _, y) in zip(ours.calls, ref.calls):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=f"{task} {kind}")
    assert [r.task_name for r in a.task_results] == [r.task_name for r in b.task_results]
    for r, s in zip(a.task_results, b.task_results):
        assert r.get_score() == pytest.approx(s.get_score(), abs=1e-6), r.task_name
    return ours


@pytest.mark.slow
def test_mock_tasks_equal_mtebs_sentence_transformers_wrapper(tiny_folder):
    from sentence_transformers import SentenceTransformer

    from embeddinggemma_jax import EmbeddingGemma

    ours = _compare(EmbeddingGemma.from_pretrained(tiny_folder), SentenceTransformer(str(tiny_folder), device="cpu"))
    assert ours.mteb_model_meta.embed_dim == 40 and ours.mteb_model_meta.similarity_fn_name.value == "cosine"


@pytest.mark.real
@pytest.mark.slow
def test_real_weights_mock_tasks_equal_mtebs_wrapper_with_the_task_prompts(real_model, st_model):
    """Real weights: the model's task-type prompts (STS, Retrieval-query, Classification, ...) are picked
    as mteb's EmbeddingGemma entry picks them."""
    from mteb.mocks.mock_tasks import MockSTSTask

    from embeddinggemma_jax.integrations.mteb import EmbeddingGemmaMTEB

    _compare(real_model, st_model)
    adapter = EmbeddingGemmaMTEB(real_model)
    assert adapter.prompt_for(MockSTSTask().metadata, None) == real_model.prompts["STS"]
