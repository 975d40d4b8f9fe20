"""The train step with the TPU kernels (``TrainConfig.attention="splash"``: splash attention with its
backward kernels, and the fused q/k norm + RoPE pass with its XLA backward), run here in Pallas interpret
mode, computes today's XLA step's loss and gradients (only memory and time differ on a TPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embeddinggemma_jax import attention_kernels
from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.data import BatchEncoder, TextBatch


@pytest.mark.parametrize("scale", [0.0625, None])
def test_norm_rope_heads_gradient_is_the_xla_ops_gradient(scale):
    """The fused kernel's gradient (its custom vjp) against autodiff through the XLA path's own ops
    (RMSNorm, apply_rope, the query scale), for the input and the norm weight."""
    from embeddinggemma_jax.layers import RMSNorm, apply_rope, rope_tables

    L, Hd, heads = 128, 256, 3
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, L, heads, Hd)) * 3, jnp.float32)
    w = jnp.asarray(rng.normal(size=Hd) * 0.3, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, heads, L, Hd)), jnp.float32)
    cos, sin = rope_tables(jnp.arange(L), Hd, 10_000.0, jnp.float32)

    def xla_ops(x, w):
        norm = RMSNorm(Hd, 1e-6)
        norm.scale[...] = w
        y = apply_rope(norm(x), cos, sin)
        y = y if scale is None else y * jnp.asarray(scale, jnp.float32)
        return jnp.sum(y.transpose(0, 2, 1, 3) * cot)

    def fused(x, w):
        return jnp.sum(attention_kernels.norm_rope_heads(x, w, cos, sin, 1e-6, scale, interpret=True) * cot)

    ref = jax.jit(jax.value_and_grad(xla_ops, argnums=(0, 1)))(x, w)
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.slow
def test_splash_train_step_gives_the_xla_step_loss_and_gradients(tmp_path):
    """A model with EmbeddingGemma's head_dim (so the fused norm + RoPE kernel runs too) on 128-token
    batches (splash's tile): loss and every gradient within the issue's fp32 bar (rtol 1e-5) of the XLA
    step, which stays the default (so today's CPU step is unchanged, bit for bit)."""
    from embeddinggemma_jax.config import EncoderConfig
    from embeddinggemma_jax.testing import make_tiny_folder
    from embeddinggemma_jax.train.run import load_base

    folder = make_tiny_folder(tmp_path / "m", seed=2, enc=EncoderConfig.tiny(head_dim=256))
    qs = ["alpha beta gamma delta epsilon " * 3, "zeta eta", "theta iota kappa lambda mu nu", "xi"]
    ds = ["doc one: alpha beta gamma delta", "doc two: zeta eta theta iota kappa " * 4, "doc three", "doc four"]
    calls = []
    real = attention_kernels.splash_heads
    out = {}
    for attention in ("xla", "splash"):
        cfg = st.TrainConfig(dtype="float32", matryoshka_dims=(40, 16), remat=True, attention=attention)
        base, module = load_base(str(folder), cfg)
        t, params = st.make_trainable(module, cfg)
        enc = BatchEncoder(base.tokenizer, base.head_config.prompts, 128, (128,), "query", "document")
        batch = enc.encode([TextBatch(qs, ds, None)])
        attention_kernels.splash_heads = lambda *a, **k: calls.append(attention) or real(*a, **k)
        try:
            loss, grads = st.loss_and_grads(t, cfg, params, batch, (40, 16), (1.0, 1.0))
        finally:
            attention_kernels.splash_heads = real
        out[attention] = (float(loss), jax.tree.leaves(grads))
    assert set(calls) == {"splash"}  # the kernel ran, and only in the splash step
    np.testing.assert_allclose(out["splash"][0], out["xla"][0], rtol=1e-5)
    # Splash's online softmax sums in another order than XLA's softmax: a handful of gradient entries
    # (3 of 13,632 here) differ by ~2e-6 where the largest entry of their tensor is ~0.5; so the absolute
    # floor is 1e-5 of each tensor's largest magnitude, the relative bar the 1e-5.
    for a, b in zip(out["splash"][1], out["xla"][1]):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_unknown_train_attention_is_refused():
    with pytest.raises(ValueError, match="attention"):
        st.TrainConfig(attention="flash")
