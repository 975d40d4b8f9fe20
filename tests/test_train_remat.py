"""The remat policies of the train step compute the same loss and gradients (only memory and time differ)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.data import BatchEncoder, TextBatch


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])
def test_remat_policies_give_the_same_loss_and_gradients(tiny_folder, cached):
    from embeddinggemma_jax.batching import TRAIN_LENGTH_BUCKETS
    from embeddinggemma_jax.train.run import load_base

    qs = ["alpha beta gamma delta epsilon", "zeta eta", "theta iota kappa lambda mu nu", "xi"]
    ds = ["doc one: alpha beta gamma delta", "doc two: zeta eta theta iota kappa", "doc three", "doc four: xi xi"]
    out = {}
    for policy in ("full", "dots"):  # full: today's step
        cfg = st.TrainConfig(dtype="float32", matryoshka_dims=(40, 16), remat=True, remat_policy=policy,
                             cached_loss=cached, mini_batch_size=2 if cached else None)
        base, module = load_base(str(tiny_folder), cfg)
        t, params = st.make_trainable(module, cfg)
        enc = BatchEncoder(base.tokenizer, base.head_config.prompts, 64, TRAIN_LENGTH_BUCKETS, "query", "document")
        batch = enc.encode([TextBatch(qs, ds, None)])
        loss, grads = st.loss_and_grads(t, cfg, params, batch, (40, 16), (1.0, 1.0))
        out[policy] = (float(loss), jax.tree.leaves(grads))
    # The bar for a faster step: fp32 loss and gradients within rtol 1e-5 of today's (atol for the
    # near-zero entries, where the two programs' fp32 rounding differs by ~1e-7).
    np.testing.assert_allclose(out["dots"][0], out["full"][0], rtol=1e-5)
    for a, b in zip(out["dots"][1], out["full"][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat_policy"):
        st.TrainConfig(remat_policy="some")
