"""Each accelerator attention path against the plain XLA path (``attention.attend(impl="xla")``).

The cuDNN path runs its own code (key lengths, blocked windows, masks) through
``jax.nn.dot_product_attention(implementation="xla")``, the same call with cuDNN swapped out;
splash runs in Pallas interpret mode. Inputs are several times longer than the window, with
right padding, so both the blocked layout and the padding handling are exercised. Padded query
rows are dropped by the pooling and are only required to be finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embeddinggemma_jax import attention, attention_kernels, attention_xla

B, K, G, H = 3, 1, 3, 32


def _inputs(L, lengths, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, L, K, G, H)) * 0.25, dtype)
    k = jnp.asarray(rng.normal(size=(B, L, K, H)), dtype)
    v = jnp.asarray(rng.normal(size=(B, L, K, H)), dtype)
    valid = jnp.asarray(np.arange(L)[None, :] < np.asarray(lengths)[:, None])
    return q, k, v, valid


def _run(fn, q, k, v, valid, radius, dtype, impl, **kw):
    """One jitted call: eager op-by-op dispatch would dominate the test time."""
    return jax.jit(lambda *a: fn(*a, radius, dtype, impl, **kw))(q, k, v, valid)


def _check(out, ref, valid, atol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "padded rows must stay finite (NaN would leak through 0 * NaN)"
    m = np.asarray(valid)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(m, out, 0), np.where(m, ref, 0), atol=atol, rtol=0)


CASES = [  # (L, lengths, radius): dense, local several windows long, short rows, an all-padding row
    (64, (64, 40, 1), None),
    (16, (16, 11, 9), 8),  # the window covers the whole row: the dense masked path
    (200, (200, 123, 17), 8),  # L = 12x the radius: the blocked local path
    (250, (250, 250, 0), 24),  # an all-padding row (batches are filled up with them)
    (256, (256, 100, 7), None),
]


@pytest.mark.parametrize("L,lengths,radius", CASES)
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_cudnn_code_path_matches_xla(L, lengths, radius, dtype, atol):
    q, k, v, valid = _inputs(L, lengths, dtype)
    if radius is not None:
        assert attention_xla.use_local(L, radius) == (L > 2 * radius + 1)
    ref = _run(attention.attend, q, k, v, valid, radius, dtype, "xla")
    out = _run(attention_kernels.attend, q, k, v, valid, radius, dtype, "cudnn", dpa_implementation="xla")
    _check(out, ref, valid, atol)


@pytest.mark.parametrize("L,lengths,radius", [(200, (200, 123, 17), 8), (64, (64, 40, 1), None),
                                              (250, (250, 250, 0), 24)])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_splash_interpret_matches_xla(L, lengths, radius, dtype, atol):
    q, k, v, valid = _inputs(L, lengths, dtype, seed=1)
    ref = _run(attention.attend, q, k, v, valid, radius, dtype, "xla")
    out = _run(attention_kernels.attend, q, k, v, valid, radius, dtype, "splash")  # the kernel itself, any L
    _check(out, ref, valid, atol)


def test_splash_runs_only_where_whole_tiles_pay():
    # Splash pads to 128-token tiles: from 128 tokens with at most 15% of the padded length as padding.
    assert attention.kernel_for_length("splash", 12) == "xla"
    assert attention.kernel_for_length("splash", 127) == "xla"
    assert attention.kernel_for_length("splash", 128) == "splash"
    assert attention.kernel_for_length("splash", 144) == "xla"  # 256 tiles, 44% padding
    assert attention.kernel_for_length("splash", 224) == "splash"  # 256 tiles, 12.5% padding
    assert attention.kernel_for_length("splash", 320) == "xla"  # 384 tiles, 16.7% padding
    assert attention.kernel_for_length("splash", 2048) == "splash"
    assert attention.kernel_for_length("xla", 2048) == "xla"
    assert attention.kernel_for_length("cudnn", 12) == "cudnn"


def test_cudnn_fp32_goes_to_the_xla_path():
    # cuDNN flash attention has no fp32 kernel: the kernel choice sends fp32 on a GPU to XLA, and the
    # cuDNN kernel refuses fp32 with a message rather than failing inside cuDNN.
    assert attention.select_impl("gpu", jnp.float32) == "xla"
    assert attention.select_impl("gpu", "float32") == "xla"
    assert attention.select_impl("gpu", jnp.bfloat16) == "cudnn"
    q, k, v, valid = _inputs(200, (200, 50, 3), jnp.float32)
    with pytest.raises(ValueError, match="no float32 kernel"):
        _run(attention_kernels.attend, q, k, v, valid, 8, jnp.float32, "cudnn")


def test_backend_selects_kernel_and_unknown_impl_is_refused():
    assert attention.select_impl("gpu") == "cudnn"
    assert attention.select_impl("tpu") == "splash"
    assert attention.select_impl("cpu") == "xla"
    assert attention.select_impl("tpu", jnp.float32) == "splash"
    q, k, v, valid = _inputs(64, (64, 64, 64), jnp.float32)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attention.attend(q, k, v, valid, None, jnp.float32, "flash")


@pytest.mark.slow
def test_tiny_model_embeddings_with_splash_equal_xla(tiny_folder):
    """End to end: every layer (sliding and full) through splash gives the XLA path's embeddings."""
    from embeddinggemma_jax import EmbeddingGemma

    # Byte tokenizer: 112-122 tokens, one length bucket (one compilation per path), window 8.
    texts = ["x" * 110, "a longer text " * 8, "y" * 120]
    ref = EmbeddingGemma.from_pretrained(tiny_folder, attention_impl="xla").encode(texts)
    out = EmbeddingGemma.from_pretrained(tiny_folder, attention_impl="splash").encode(texts)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)
