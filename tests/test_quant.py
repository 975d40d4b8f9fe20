"""Quantized inference (``quant``): the quantizer and the quantized matmuls against a numpy
fake-quantization written here independently, whole tiny models against a float model holding the
numpy fake-quantized weights, the quantized Orbax round trip, and the real weights against fp32."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from embeddinggemma_jax import quant
from embeddinggemma_jax.errors import ConfigError
from embeddinggemma_jax.model import EmbeddingGemma
from embeddinggemma_jax.weights import iter_params

WEIGHT_ONLY = [m for m in quant.MODE_NAMES if not quant.MODES[m][1]]
_TINY_SQRT = np.sqrt(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- numpy reference
def np_fake_quant(w: np.ndarray, axes: tuple[int, ...], bits: int, block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(integer values, dequantized float64 weight): symmetric absmax per channel or per block of
    ``block`` values along the last contraction axis, one group at a time, as Qwix defines it:
    scale = max|w| / (qmax + 0.5) (1 where that is below sqrt of fp32's tiny), q = round(w / scale)
    half to even, saturated to [-qmax - 1, qmax]. XLA compiles Qwix's two divisions as
    multiplications by the reciprocal (of the constant; of the scale); so does this reference, to
    match it bit for bit."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float64)
    q = np.zeros(w.shape, np.int64)
    deq = np.zeros(w.shape, np.float64)
    a = axes[-1]
    # per channel a group spans every contraction axis; a block lies along the last one only
    other = [i for i in range(w.ndim) if (i not in axes if block is None else i != a)]
    for idx in np.ndindex(*[w.shape[i] for i in other]):
        sel = [slice(None)] * w.ndim
        for i, v in zip(other, idx):
            sel[i] = v
        starts = [0] if block is None else range(0, w.shape[a], block)
        for s0 in starts:
            g = list(sel)
            if block is not None:
                g[a] = slice(s0, s0 + block)
            g = tuple(g)
            # the scale as the JAX code forms it: fp32 max / qmax in fp32
            amax = np.float32(np.abs(w[g].astype(np.float32)).max())
            scale = amax * np.float32(1 / (qmax + 0.5))
            scale = np.float64(scale) if scale >= _TINY_SQRT else 1.0
            qq = np.clip(np.round(w[g].astype(np.float32) * (np.float32(1) / np.float32(scale))), -qmax - 1, qmax)
            q[g] = qq
            deq[g] = qq * scale
    return q, deq


def np_act_quant(x: np.ndarray, axes: tuple[int, ...]):
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=axes, keepdims=True) * np.float32(1 / 127.5)  # as np_fake_quant
    scale = np.where(scale >= _TINY_SQRT, scale, np.float32(1.0)).astype(np.float32)
    return np.clip(np.round(x * (np.float32(1) / scale)), -128, 127).astype(np.int64), scale.astype(np.float64)


CASES = [  # (einsum, x shape, w shape, contraction axes of w)
    ("BLD,DNH->BLNH", (2, 5, 48), (48, 3, 16), (0,)),
    ("BLNH,NHD->BLD", (2, 5, 3, 40), (3, 40, 48), (0, 1)),  # blocks of 32 over H = 40: a short last block
    ("BLD,DF->BLF", (2, 5, 71), (71, 37), (0,)),
    ("BD,DE->BE", (4, 48), (48, 187), (0,)),
]


@pytest.mark.parametrize("spec", [quant.Spec(8, 32), quant.Spec(8, 8), quant.Spec(8, None), quant.Spec(4, 32), quant.Spec(4, None)],
                         ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_weight_only_matmul_equals_numpy_fake_quant(spec, case):
    eq, xs, ws, axes = case
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=xs).astype(np.float32), rng.normal(size=ws).astype(np.float32)
    q, scale = quant.quantize_array(jnp.asarray(w), axes, spec)
    q_ref, deq_ref = np_fake_quant(w, axes, spec.bits, spec.block)
    np.testing.assert_array_equal(np.asarray(q, np.int64), q_ref)
    assert q.dtype == (jnp.int8 if spec.bits == 8 else jnp.int4)
    qw = quant.QuantizedWeight(q, scale, axes, spec.block, spec.bits, None, False)
    np.testing.assert_allclose(np.asarray(qw.dequantize(jnp.float32)), deq_ref, rtol=1e-6, atol=0)
    import jax
    got = np.asarray(qw.einsum(eq, jnp.asarray(x), jnp.float32, jax.lax.Precision.HIGHEST))
    want = np.einsum(eq, x.astype(np.float64), deq_ref)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_int8_activation_matmul_is_exact_integer_product(case):
    eq, xs, ws, axes = case
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=xs).astype(np.float32), rng.normal(size=ws).astype(np.float32)
    q, scale = quant.quantize_array(jnp.asarray(w), axes, quant.Spec(8, None))
    q_ref, _ = np_fake_quant(w, axes, 8, None)
    w_scale = np.abs(w).max(axis=axes, keepdims=True).astype(np.float32) * np.float32(1 / 127.5)
    x_ax = tuple(range(len(xs) - len(axes), len(xs)))
    xq, x_scale = np_act_quant(x, x_ax)
    acc = np.einsum(eq, xq, q_ref)  # exact in int64
    want = acc * x_scale.reshape(x_scale.shape[:len(xs) - len(axes)] + (1,) * (len(ws) - len(axes))) \
        * w_scale.reshape(ws[len(axes):]).astype(np.float64)
    qw = quant.QuantizedWeight(q, scale, axes, None, 8, 8, False)
    got = np.asarray(qw.einsum(eq, jnp.asarray(x), jnp.float32, None))
    # the int32 accumulation is exact; only the two fp32 rescaling multiplications round
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)


def np_gptq(w: np.ndarray, n_contract: int, bits: int, block: int | None, hessian: np.ndarray, damp: float):
    """GPTQ as optimal brain quantization states it, written without the Cholesky trick: quantize one
    input row, move the rows not yet quantized by -(error) x H^-1[rest, r] / H^-1[r, r], then take row
    r out of the inverse Hessian (a rank-one downdate). Scales as ``np_fake_quant`` forms them, a
    group's from its rows when its first row is reached (per channel: from the original weight)."""
    qmax = 2 ** (bits - 1) - 1
    shape = w.shape
    n = shape[n_contract - 1]
    W = w.reshape(int(np.prod(shape[:n_contract])), -1).astype(np.float64)
    H = hessian.astype(np.float64).copy()
    H[np.diag_indices(len(H))] += damp * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H)

    def scale_of(rows):
        s = np.abs(rows.astype(np.float32)).max(axis=0) * np.float32(1 / (qmax + 0.5))
        return np.where(s >= _TINY_SQRT, s, np.float32(1)).astype(np.float32)

    Q = np.zeros(W.shape, np.int64)
    scale = scale_of(W)
    for r in range(len(W)):
        if block is not None and r % n % block == 0:
            scale = scale_of(W[r:min(r + block, r - r % n + n)])
        Q[r] = np.clip(np.round(W[r].astype(np.float32) * (np.float32(1) / scale)), -qmax - 1, qmax)
        err = W[r] - Q[r] * scale.astype(np.float64)
        W[r + 1:] -= np.outer(Hinv[r + 1:, r] / Hinv[r, r], err)
        Hinv = Hinv - np.outer(Hinv[:, r], Hinv[r, :]) / Hinv[r, r]
    return Q.reshape(shape)


@pytest.mark.parametrize("spec", [quant.Spec(4, 32), quant.Spec(4, None), quant.Spec(8, 16)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_gptq_equals_numpy_obq_reference(spec, case):
    """quant.gptq_array (Cholesky form) against the OBQ form above: the same integers, bit for bit;
    and on its own calibration inputs it has less output error than absmax rounding."""
    eq, xs, ws, axes = case
    rng = np.random.default_rng(3)
    w = rng.normal(size=ws).astype(np.float32)
    k = int(np.prod(ws[:len(axes)]))
    x = rng.normal(size=(64, k)) * rng.gamma(1.0, size=k)  # uneven input channels, as in the model
    hessian = x.T @ x
    q, scale = quant.gptq_array(w, axes, spec, hessian, damp=0.01)
    np.testing.assert_array_equal(np.asarray(q, np.int64), np_gptq(w, len(axes), spec.bits, spec.block, hessian, 0.01))
    deq = np.asarray(quant.dequantize_array(q, scale, axes, spec.block), np.float64).reshape(k, -1)
    _, rtn = np_fake_quant(w, axes, spec.bits, spec.block)
    w2 = w.reshape(k, -1).astype(np.float64)
    assert np.linalg.norm(x @ (deq - w2)) < np.linalg.norm(x @ (rtn.reshape(k, -1) - w2))


def test_embedding_rows_dequantize_like_numpy():
    rng = np.random.default_rng(2)
    table = rng.normal(size=(50, 48)).astype(np.float32)
    ids = np.array([[3, 0, 49], [7, 7, 1]])
    for spec in (quant.Spec(8, 32), quant.Spec(4, None)):
        q, scale = quant.quantize_array(jnp.asarray(table), (1,), spec)
        _, deq = np_fake_quant(table, (1,), spec.bits, spec.block)
        qw = quant.QuantizedWeight(q, scale, (1,), spec.block, spec.bits, None, False)
        np.testing.assert_allclose(np.asarray(qw.take_rows(jnp.asarray(ids))), deq[ids], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- whole tiny models
TEXTS = ["hello world", "", "The red planet is Mars; it has two moons.", "机器学习 🙂"]  # one length bucket


@pytest.fixture(scope="module")
def tiny_float(tiny_folder):
    return EmbeddingGemma.from_pretrained(tiny_folder)


@pytest.mark.parametrize("mode", WEIGHT_ONLY)
def test_tiny_weight_only_model_equals_float_model_with_numpy_fake_quant_weights(tiny_folder, tiny_float, mode):
    specs, _ = quant.MODES[mode]
    fq = EmbeddingGemma.from_pretrained(tiny_folder)  # its float weights replaced by numpy fake-quant values
    targets = {"/".join(p): (kind, axes) for p, kind, axes in quant.TARGETS}
    for path, var in iter_params(fq.state):
        key = "/".join(path)
        if key in targets:
            kind, axes = targets[key]
            layered = "layers" in path
            w = np.asarray(var.get_value())
            if layered:
                deq = np.stack([np_fake_quant(wi, axes, specs[kind].bits, specs[kind].block)[1] for wi in w])
            else:
                deq = np_fake_quant(w, axes, specs[kind].bits, specs[kind].block)[1]
            var.set_value(jnp.asarray(deq, jnp.float32))
    got = EmbeddingGemma.from_pretrained(tiny_folder, quantize=mode).encode(TEXTS)
    want = fq.encode(TEXTS)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert np.abs(want - tiny_float.encode(TEXTS)).max() > 1e-4  # the quantization does change the output


def test_tiny_int8_model_quantizes_every_matmul_input(tiny_folder, tiny_float):
    model = tiny_float.quantized("int8")
    kinds = [(type(m).__name__, m.act_bits) for m in
             (model.module.encoder.layers.self_attn.q_proj, model.module.encoder.layers.mlp.down_proj,
              model.module.head.dense2, model.module.encoder.embed_tokens)]
    # the per-token projections take int8 inputs; the Dense head and the embedding lookup do not
    assert kinds == [("QuantizedWeight", 8)] * 2 + [("QuantizedWeight", None)] * 2
    a, b = model.encode(TEXTS), tiny_float.quantized("int8").encode(TEXTS)
    np.testing.assert_array_equal(a, b)  # deterministic
    assert 1e-5 < np.abs(a - tiny_float.encode(TEXTS)).max()


def test_param_bytes_per_mode(tiny_float):
    fp = quant.param_bytes(tiny_float.module)
    sizes = {m: quant.param_bytes(tiny_float.quantized(m).module) for m in quant.MODE_NAMES}
    n = sum(int(np.prod(v.get_value().shape)) for _, v in iter_params(tiny_float.state))
    assert fp == 4 * n
    # int8-weights: the matmuls in blocks of 8 (12 bits a weight with the fp32 scale), the table in blocks of 32
    assert sizes["int4-weights"] < sizes["int8-weights"] < 0.4 * fp
    assert sizes["mixed"] < sizes["int8"] < fp / 3


def test_quantized_checkpoint_round_trip(tiny_folder, tiny_float, tmp_path):
    from embeddinggemma_jax import checkpoint

    for mode in quant.MODE_NAMES:
        model = EmbeddingGemma.from_pretrained(tiny_folder, quantize=mode)
        out = model.save_checkpoint(tmp_path / mode)
        assert checkpoint.read_marker(out)["quantize"] == mode
        back = EmbeddingGemma.from_pretrained(out)
        assert back.quantize == mode
        q = back.module.encoder.layers.mlp.gate_proj.q.get_value()
        assert q.dtype == model.module.encoder.layers.mlp.gate_proj.q.get_value().dtype
        np.testing.assert_array_equal(back.encode(TEXTS), model.encode(TEXTS))
    with pytest.raises(ConfigError, match="quantized as 'int8'"):
        EmbeddingGemma.from_pretrained(tmp_path / "int8", quantize="int4-weights")


def test_quantized_model_saves_and_exports_a_dequantized_folder(tiny_folder, tmp_path, capsys):
    """save_pretrained and export of a quantized model write float tensors holding the values the
    integers and scales stand for: the folder, loaded as a float model, gives the weight-only
    quantized model's embeddings (int8's activation quantization is not a weight and is not kept)."""
    from embeddinggemma_jax.cli import main

    model = EmbeddingGemma.from_pretrained(tiny_folder, quantize="mixed")
    want = model.encode(TEXTS)
    back = EmbeddingGemma.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert back.quantize is None
    np.testing.assert_allclose(back.encode(TEXTS), want, rtol=0, atol=2e-6)

    model = EmbeddingGemma.from_pretrained(tiny_folder, quantize="int8-weights")
    ckpt = model.save_checkpoint(tmp_path / "q.orbax")
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "exported")]) == 0
    assert "dequantized from int8-weights" in capsys.readouterr().out
    exported = EmbeddingGemma.from_pretrained(tmp_path / "exported")
    np.testing.assert_allclose(exported.encode(TEXTS), model.encode(TEXTS), rtol=0, atol=2e-6)


def test_bf16_model_quantizes_the_fp32_weights(tiny_folder, tiny_float):
    """from_pretrained(dtype="bfloat16", quantize=...) rounds the fp32 weights to integers, not weights
    already rounded to bf16; the norms left float take the bf16 param_dtype."""
    model = EmbeddingGemma.from_pretrained(tiny_folder, dtype="bfloat16", quantize="int8-weights")
    w = tiny_float.module.encoder.layers.mlp.gate_proj.get_value()
    want, _ = quant.quantize_array(w, (1,), quant.MODES["int8-weights"][0]["mlp"])
    np.testing.assert_array_equal(model.module.encoder.layers.mlp.gate_proj.q.get_value(), want)
    from_bf16, _ = quant.quantize_array(w.astype(jnp.bfloat16), (1,), quant.MODES["int8-weights"][0]["mlp"])
    assert (np.asarray(from_bf16) != np.asarray(want)).any()  # the double rounding this avoids is visible
    assert model.module.encoder.norm.scale.get_value().dtype == jnp.bfloat16


def test_unknown_mode_is_refused(tiny_folder):
    with pytest.raises(ConfigError, match="unknown quantization mode 'int2'"):
        EmbeddingGemma.from_pretrained(tiny_folder, quantize="int2")


@pytest.mark.slow
def test_gptq_module_keeps_the_quantized_layout(tiny_folder, tiny_float):
    """calibration.gptq_module on the tiny model: every quantized parameter in the layout (shapes,
    integer dtypes, static fields) quantize_module gives, the embedding table rounded as absmax
    rounding rounds it, the matmul integers chosen otherwise; and the model runs."""
    from flax import nnx

    from embeddinggemma_jax import calibration

    specs = quant.MODES["int4-weights"][0]
    batches = [(b.ids, b.mask) for b in tiny_float.batches(tiny_float.tokenizer.encode(TEXTS + ["more text, the end"]))]
    module = calibration.gptq_module(tiny_float.module, specs, batches)
    rtn = tiny_float.quantized("int4-weights").module
    got = {p: m for p, m in nnx.iter_graph(module) if isinstance(m, quant.QuantizedWeight)}
    want = {p: m for p, m in nnx.iter_graph(rtn) if isinstance(m, quant.QuantizedWeight)}
    assert got.keys() == want.keys() and len(got) == len(quant.TARGETS)
    for p, m in want.items():
        g = got[p]
        assert (g.q.shape, g.q.dtype, g.scale.shape, g.axes, g.block, g.bits, g.layered) == \
            (m.q.shape, m.q.dtype, m.scale.shape, m.axes, m.block, m.bits, m.layered), p
    np.testing.assert_array_equal(module.encoder.embed_tokens.q.get_value(), rtn.encoder.embed_tokens.q.get_value())
    assert (np.asarray(module.encoder.layers.mlp.up_proj.q.get_value())
            != np.asarray(rtn.encoder.layers.mlp.up_proj.q.get_value())).any()
    out = EmbeddingGemma(module, tiny_float.encoder_config, tiny_float.head_config, tiny_float.tokenizer,
                         quantize="int4-weights").encode(TEXTS)
    assert np.isfinite(out).all() and np.sum(out * tiny_float.encode(TEXTS), axis=-1).min() > 0.9


# ----------------------------------------------------------------------------- the commands
def test_encode_convert_and_embed_take_quantize(tiny_folder, tiny_float, tmp_path, capsys):
    import json

    from embeddinggemma_jax.batch import shards
    from embeddinggemma_jax.cli import main

    want = tiny_float.quantized("int8").encode(TEXTS[:2], prompt_name="query")
    assert main(["encode", "--model", str(tiny_folder), "--quantize", "int8", "--prompt-name", "query", *TEXTS[:2]]) == 0
    got = np.asarray(json.loads(capsys.readouterr().out))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    ckpt = tmp_path / "q.orbax"
    assert main(["convert", "--model", str(tiny_folder), "--output", str(ckpt), "--quantize", "mixed"]) == 0
    assert "quantized mixed" in capsys.readouterr().out
    back = EmbeddingGemma.from_pretrained(ckpt)
    assert back.quantize == "mixed"
    np.testing.assert_array_equal(back.encode(TEXTS), tiny_float.quantized("mixed").encode(TEXTS))

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    assert main(["embed", "--model", str(tiny_folder), "--quantize", "int8-weights", "--input", str(corpus),
                 "--output", str(tmp_path / "out")]) == 0
    _, emb = shards.load_all(tmp_path / "out")
    want = tiny_float.quantized("int8-weights").encode(TEXTS[:3], prompt_name="document")
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-5)


def test_parity_quantize_uses_the_mode_threshold(tiny_folder, tmp_path, capsys):
    import json

    from conversion.parity import QUANT_MIN_COSINE
    from embeddinggemma_jax.cli import main

    texts = tmp_path / "t.json"
    texts.write_text(json.dumps(TEXTS))
    for mode in ("int8-weights", "mixed"):
        report = tmp_path / f"{mode}.json"
        main(["parity", "--model", str(tiny_folder), "--texts", str(texts), "--quantize", mode, "--report", str(report)])
        r = json.loads(report.read_text())
        assert r["quantize"] == mode and r["min_cosine_threshold"] == QUANT_MIN_COSINE[mode]
        assert r["summary"]["min_cosine"] < 0.99999  # quantized: no longer the fp32 port's agreement
    assert QUANT_MIN_COSINE["mixed"] is None and "measured only" in capsys.readouterr().out


def test_embed_refuses_int4_modes_in_one_line(tiny_folder, tmp_path, capsys):
    from embeddinggemma_jax.cli import main

    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"text": "a"}\n')
    assert main(["embed", "--model", str(tiny_folder), "--quantize", "mixed", "--input", str(corpus),
                 "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "int4 weights" in err[-1] and "XLA" in err[-1] and "int8-weights" in err[-1]


# ----------------------------------------------------------------------------- the real weights
# min cosine to the fp32 model; bf16 compute is gated for the int8 modes, whose weights are
# rounded from the fp32 ones (docs/quantization.md, "int8 in bf16 compute").
GATES = {"float32": {"int8-weights": 0.999, "int8": 0.99, "int4-weights": 0.99, "mixed": 0.98},
         "bfloat16": {"int8-weights": 0.999, "int8": 0.99}}


# The gated texts: the short builtin parity cases and the two long texts that are the worst for every
# mode in benchmarks/quant_long.json (every builtin and long parity text, each mode, both compute dtypes:
# ``benchmarks/quant_recipes.py --long``); all long ones here would take minutes per mode on a 2-core CPU.
GATE_LONG = ("len-4000 repetitive (truncated)", "parity-set 2049 tokens")


@pytest.fixture(scope="module")
def gate_texts(real_model):
    """The texts and the fp32 model's embeddings of them (which match sentence-transformers, test_api /
    test_encoder_parity), computed once for every mode and compute dtype."""
    from conversion.parity import SHORT_CASES
    from benchmarks.quant_recipes import texts_for

    cases = [c for c in texts_for(real_model, long=True) if c[0] in GATE_LONG or c in SHORT_CASES]
    assert len(cases) == len(SHORT_CASES) + len(GATE_LONG)
    assert len(real_model.tokenizer.encode([cases[-1][1]])[0]) == 2048
    return cases, real_model.encode([t for _, t in cases])


def _gate(model, gate_texts, gate, label):
    from embeddinggemma_jax.cli import DEMO_DOCUMENTS, DEMO_QUERY

    cases, ref = gate_texts
    cos = np.sum(model.encode([t for _, t in cases]) * ref, axis=-1)
    worst = int(np.argmin(cos))
    print(f"{label}: min cosine {cos.min():.5f} on {cases[worst][0]!r} ({len(cases)} texts)")
    assert cos.min() >= gate, (label, cases[worst][0], cos.min())
    sims = model.similarity(model.encode_query(DEMO_QUERY), model.encode_document(DEMO_DOCUMENTS))[0]
    assert int(np.argmax(sims)) == 1, (label, sims)  # still ranks the model card's answer first


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GATES["float32"]))
def test_real_modes_against_fp32(real_model, gate_texts, mode):
    """Every mode in fp32 compute, on the builtin parity texts (short edge inputs, scripts, code, 2,048
    tokens, a truncated repetitive text) and the long texts of the parity set, against the fp32 model."""
    _gate(real_model.quantized(mode), gate_texts, GATES["float32"][mode], f"{mode} (float32)")


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GATES["bfloat16"]))
def test_real_int8_modes_in_bf16_against_fp32(real_folder, gate_texts, mode):
    """The int8 modes in bf16 compute, loaded as a user loads them, on the same texts."""
    model = EmbeddingGemma.from_pretrained(real_folder, dtype="bfloat16", quantize=mode)
    _gate(model, gate_texts, GATES["bfloat16"][mode], f"{mode} (bfloat16)")
