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


@pytest.mark.parametrize("heads,scale", [(3, 0.0625), (1, None)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_norm_rope_equals_the_xla_ops(heads, scale, dtype):
    """The TPU path's q/k norm + RoPE (+ query scale) kernel, in interpret mode, against the XLA path's
    RMSNorm, apply_rope and scaling, each op rounded to the dtype as there: equal up to the last bit.
    L = 1152 runs three 384-row blocks; head_dim 256 (EmbeddingGemma's, where the kernel is used)."""
    from embeddinggemma_jax.layers import RMSNorm, apply_rope, rope_tables

    L, Hd = 1152, 256
    assert attention_kernels.fused_norm_rope_fits(Hd) and not attention_kernels.fused_norm_rope_fits(16)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, L, heads, Hd)) * 3, dtype)
    norm = RMSNorm(Hd, 1e-6)
    norm.scale[...] = jnp.asarray(rng.normal(size=Hd) * 0.3, jnp.float32)
    cos, sin = rope_tables(jnp.arange(L), Hd, 10_000.0, dtype)

    def xla_ops(x):
        y = apply_rope(norm(x), cos, sin)
        return (y if scale is None else y * jnp.asarray(scale, dtype)).transpose(0, 2, 1, 3)

    ref = jax.jit(xla_ops)(x)
    out = jax.jit(lambda x: attention_kernels.norm_rope_heads(x, norm.scale[...], cos, sin, 1e-6, scale,
                                                              interpret=True))(x)
    assert out.shape == (2, heads, L, Hd) and out.dtype == dtype
    o, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    # The fp32 arithmetic inside may differ in its last bit (the CPU compiler contracts a product and a sum
    # into one FMA in one program and not in the other): in fp32 that is all; in bf16 a value that lands
    # on a rounding boundary moves by one bf16 step, for a handful of elements (10 of 1.8M here), and
    # moves the rotated values by at most a step of the head vector's largest value.
    if dtype == jnp.bfloat16:
        assert (o != r).mean() < 1e-4
        assert (np.abs(o - r) <= 2.0 ** -7 * np.abs(r).max(-1, keepdims=True)).all()
    else:
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_model_with_head_dim_256_through_the_fused_kernel_equals_xla(tmp_path, monkeypatch):
    """End to end with EmbeddingGemma's head_dim: the splash path runs q/k through ``norm_rope_heads``
    (counted) and gives the XLA path's embeddings."""
    from embeddinggemma_jax import EmbeddingGemma
    from embeddinggemma_jax.config import EncoderConfig
    from embeddinggemma_jax.testing import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "m", seed=1, enc=EncoderConfig.tiny(head_dim=256))
    calls = []
    real = attention_kernels.norm_rope_heads
    monkeypatch.setattr(attention_kernels, "norm_rope_heads", lambda *a, **k: calls.append(1) or real(*a, **k))
    texts = ["x" * 110, "a longer text " * 8, "y" * 120]
    ref = EmbeddingGemma.from_pretrained(folder, attention_impl="xla").encode(texts)
    assert not calls
    out = EmbeddingGemma.from_pretrained(folder, attention_impl="splash").encode(texts)
    assert calls  # q and k of the sliding and the full layer branch
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)


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
