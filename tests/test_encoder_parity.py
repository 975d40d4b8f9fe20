"""The encoder against transformers' Gemma3TextModel (tiny, per layer) and sentence-transformers (real)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embeddinggemma_jax import EmbeddingGemma
from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.export import sentence_transformers_files
from embeddinggemma_jax.head import abstract_module, count_params
from embeddinggemma_jax.safetensors_io import save_file
from embeddinggemma_jax.testing import write_byte_tokenizer

torch = pytest.importorskip("torch")


# --------------------------------------------------------------------------- tiny, layer by layer
def _torch_tiny_folder(path, sliding_window=8, seed=0):
    """A tiny random Gemma3TextModel built and saved by transformers itself, plus a random head."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=263, hidden_size=48, intermediate_size=71, num_hidden_layers=4, num_attention_heads=3,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128, use_bidirectional_attention=True, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    model = Gemma3TextModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm offsets, so the "1 +" matters
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    saved = json.loads((path / "config.json").read_text())
    assert saved["sliding_window"] == sliding_window, "transformers wrote a rewritten window"
    enc = EncoderConfig.from_hf_config(saved)
    head = HeadConfig.tiny(enc)
    rng = np.random.default_rng(seed)
    for rel, obj in sentence_transformers_files(enc, head, saved).items():
        if rel != "config.json":
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_text(json.dumps(obj))
    save_file({"linear.weight": rng.normal(0, 0.1, (head.hidden_features, head.in_features)).astype(np.float32)},
              path / "2_Dense/model.safetensors")
    save_file({"linear.weight": rng.normal(0, 0.1, (head.out_features, head.hidden_features)).astype(np.float32)},
              path / "3_Dense/model.safetensors")
    write_byte_tokenizer(path, head.max_seq_length)
    return model


@pytest.fixture(scope="module")
def torch_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch_tiny")
    model = _torch_tiny_folder(path)
    return path, model


def _torch_hidden(model, ids, mask):
    """Embedding output, then the residual stream after every decoder layer, then the final norm."""
    captured = []
    hooks = [model.embed_tokens.register_forward_hook(lambda m, i, o: captured.append(o))]
    for layer in model.layers:
        hooks.append(layer.register_forward_hook(
            lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    for h in hooks:
        h.remove()
    return [c.float().numpy() for c in captured], out.float().numpy()


def _padded_batch(lengths, vocab, seed=1):
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.zeros((len(lengths), L), np.int64)
    mask = np.zeros((len(lengths), L), np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, vocab, n)
        ids[r, 0], ids[r, n - 1] = 2, 1
        mask[r, :n] = 1
    return ids, mask


@pytest.mark.parametrize("lengths", [[37, 5, 23, 1], [40, 40], [9, 12, 13, 3]])
def test_tiny_per_layer_parity(torch_tiny, lengths):
    """Inputs several times longer than the window (radius 4), padded: every layer within 1e-5."""
    path, tmodel = torch_tiny
    jm = EmbeddingGemma.from_pretrained(path)
    ids, mask = _padded_batch(lengths, 263)
    t_hidden, t_out = _torch_hidden(tmodel, ids, mask)
    enc = jm.module.encoder
    j_out, j_hidden = enc(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), return_hidden=True)
    j_embed = enc.embed(jnp.asarray(ids, jnp.int32))
    valid = mask.astype(bool)
    j_all = [np.asarray(j_embed)] + [np.asarray(h) for h in j_hidden]
    assert len(j_all) == len(t_hidden) == 5
    errs = []
    for layer, (j, t) in enumerate(zip(j_all, t_hidden)):
        err = np.abs(j[valid] - t[valid]).max()
        errs.append(float(err))
        assert err <= 1e-5, f"layer {layer - 1} (0 = embeddings): max abs error {err}"
    print(f"tiny per-layer max abs error {lengths}: " + ", ".join(f"{e:.2e}" for e in errs))
    err = np.abs(np.asarray(j_out)[valid] - t_out[valid]).max()
    assert err <= 1e-5, f"final norm output: max abs error {err}"


def test_tiny_end_to_end_matches_sentence_transformers(torch_tiny):
    from sentence_transformers import SentenceTransformer

    path, _ = torch_tiny
    st = SentenceTransformer(str(path), device="cpu")
    jm = EmbeddingGemma.from_pretrained(path)
    texts = ["short", "a text longer than the sliding window of eight tokens, by a wide margin", "",
             "ünïcödé ✓ 🙂", "x" * 100, "\x00\x01\t\n control"]
    ref = st.encode(texts, convert_to_numpy=True, batch_size=4)
    for batch_size in (1, 4):
        got = jm.encode(texts, batch_size=batch_size)
        assert np.abs(got - ref).max() <= 1e-5
        assert (np.sum(got * ref, axis=1) >= 0.999999).all()


def test_window_is_symmetric_and_inclusive():
    """|i - j| <= radius attends, radius + 1 does not, on both sides (a trap other ports fall into)."""
    from embeddinggemma_jax.attention_xla import dense_attention, local_attention

    radius, L, H = 4, 23, 8
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, L, 1, 1, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, L, 1, H)), jnp.float32)
    valid = jnp.ones((1, L), bool)
    for i in (0, 11, 22):
        for j in range(L):
            v = np.zeros((1, L, 1, H), np.float32)
            v[0, j] = 1.0  # output at i reveals whether key j got any weight
            for fn in (dense_attention, local_attention):
                out = np.asarray(fn(q, k, jnp.asarray(v), valid, radius, jnp.float32))[0, i, 0, 0, 0]
                assert (out > 0) == (abs(i - j) <= radius), (fn.__name__, i, j)


def test_local_equals_dense_with_padding():
    from embeddinggemma_jax.attention_xla import dense_attention, local_attention

    rng = np.random.default_rng(1)
    B, L, K, G, H = 3, 61, 1, 3, 8
    q = jnp.asarray(rng.normal(size=(B, L, K, G, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, L, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, L, K, H)), jnp.float32)
    lengths = np.array([61, 30, 7])
    valid = jnp.asarray(np.arange(L)[None] < lengths[:, None])
    for radius in (4, 5, 16):
        d = np.asarray(dense_attention(q, k, v, valid, radius, jnp.float32))
        lo = np.asarray(local_attention(q, k, v, valid, radius, jnp.float32))
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(lo[b, :n], d[b, :n], rtol=1e-5, atol=1e-6)  # fp32 summation order
        assert np.isfinite(lo).all(), "fully masked padded rows must stay finite"


@pytest.mark.parametrize("L,radius", [(1024, None), (512, 256), (1024, 256), (1000, 40), (1000, None)])
def test_xla_attention_equals_one_plain_softmax(L, radius):
    """The XLA path runs queries in chunks / blocks under lax.map above QUERY_CHUNK: it must equal a
    single float64 softmax over the masked score matrix, at the lengths where each branch runs."""
    from embeddinggemma_jax.attention import attend

    rng = np.random.default_rng(2)
    B, K, G, H = 2, 1, 3, 16
    q = rng.normal(size=(B, L, K, G, H)).astype(np.float32)
    k = rng.normal(size=(B, L, K, H)).astype(np.float32)
    v = rng.normal(size=(B, L, K, H)).astype(np.float32)
    lengths = np.array([L, 300])
    valid = np.arange(L)[None] < lengths[:, None]
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid), radius, jnp.float32))

    s = np.einsum("blkgh,bskh->bkgls", q.astype(np.float64), k.astype(np.float64))
    mask = valid[:, None, None, None, :]
    if radius is not None:
        pos = np.arange(L)
        mask = mask & (np.abs(pos[:, None] - pos[None, :]) <= radius)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bkgls,bskh->blkgh", p / p.sum(-1, keepdims=True), v.astype(np.float64))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], ref[b, :n], rtol=1e-5, atol=2e-6)
    assert np.isfinite(got).all()


def test_full_size_parameter_count_without_allocating():
    abstract = abstract_module(EncoderConfig(), HeadConfig())
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert count_params(abstract) == 307_581_696


# --------------------------------------------------------------------------- real weights
def _texts_with_tokens(tokenizer, n_tokens: int, seed: int) -> str:
    """A varied English text of exactly ``n_tokens`` tokens including <bos>/<eos> (before truncation)."""
    import random

    words = ("the model encodes every sentence into a vector so that similar meanings land close together "
             "while unrelated ideas drift apart across many dimensions of space time river mountain music "
             "quantum ledger harvest orbit").split()
    rnd = random.Random(seed)
    text = " ".join(rnd.choice(words) for _ in range(n_tokens))
    ids = tokenizer._tok.encode(text).ids
    while len(ids) > n_tokens:
        text = text.rsplit(" ", 1)[0]
        ids = tokenizer._tok.encode(text).ids
    while len(ids) < n_tokens:  # " the" is one token
        text += " the"
        ids = tokenizer._tok.encode(text).ids
    assert len(ids) == n_tokens
    return text


def real_texts(tokenizer) -> list[str]:
    texts = [
        "", "Hello world.", "Which planet is known as the Red Planet?",
        "Der schnelle braune Fuchs springt über den faulen Hund.",  # German
        "Быстрая коричневая лиса прыгает через ленивую собаку.",  # Russian (Cyrillic)
        "敏捷的棕色狐狸跳过了懒狗。",  # Chinese
        "素早い茶色の狐がのろまな犬を飛び越える。",  # Japanese
        "الثعلب البني السريع يقفز فوق الكلب الكسول.",  # Arabic
        "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",  # Hindi (Devanagari)
        "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",  # Korean
        "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",  # Greek
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days';",
        "🚀🔥 emoji only 😀👍🏽 🇯🇵",
        "control\x00chars\x01\x02\ttab\r\nnewline\x7f",
        "   ",
        "A" * 300,
    ]
    for n, seed in [(255, 1), (256, 2), (257, 3), (258, 4), (513, 5), (1000, 6), (2046, 7), (2048, 8),
                    (2049, 9), (2050, 10)]:
        texts.append(_texts_with_tokens(tokenizer, n, seed))
    long_code = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i * i}  # комментарий {i}" for i in range(120))
    texts += [long_code, "task: search result | query: what is a vector database?",
              "Mars, known for its reddish appearance, is often referred to as the Red Planet. " * 40]
    return texts


@pytest.fixture(scope="module")
def reference(real_model, st_model):
    texts = real_texts(real_model.tokenizer)
    ref = st_model.encode(texts, batch_size=4, convert_to_numpy=True)
    return texts, ref


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


@pytest.mark.real
@pytest.mark.slow
def test_real_texts_cover_the_required_lengths(real_model, reference):
    texts, _ = reference
    lengths = [len(ids) for ids in real_model.tokenizer._tok.encode_batch(texts)]
    assert len(texts) >= 30
    for needed in (255, 256, 257, 258, 513, 1000, 2046, 2048, 2049, 2050):
        assert needed in lengths


@pytest.mark.real
@pytest.mark.slow
def test_real_fp32_batched_parity(real_model, reference):
    texts, ref = reference
    got = real_model.encode(texts, batch_size=8)
    cos = _cos(got, ref)
    worst = int(np.argmin(cos))
    print(f"fp32 batched vs sentence-transformers, {len(texts)} texts: min cosine {cos.min():.8f}, "
          f"median {np.median(cos):.8f}, max abs diff {np.abs(got - ref).max():.2e}")
    assert cos.min() >= 0.99999, f"min cosine {cos.min():.7f} on text {worst} ({texts[worst][:40]!r})"


@pytest.mark.real
@pytest.mark.slow
def test_real_fp32_one_at_a_time_parity(real_model, reference):
    texts, ref = reference
    got = np.stack([real_model.encode(t) for t in texts])
    cos = _cos(got, ref)
    print(f"fp32 one at a time vs sentence-transformers: min cosine {cos.min():.8f}, median {np.median(cos):.8f}")
    assert cos.min() >= 0.99999, f"min cosine {cos.min():.7f} on text {int(np.argmin(cos))}"


@pytest.mark.real
@pytest.mark.slow
def test_real_bf16_against_fp32_reference(real_model_bf16, real_folder, reference):
    """Every text >= 0.9995 cosine to the fp32 reference, or at least as close as the reference's own bf16 run.

    Some texts are ill-conditioned in bf16: on the short Arabic sentence (text 7) sentence-transformers' own
    bf16 run gives 0.9956 against its fp32 run, and this package's bf16 result moves between 0.9994 and 0.9965
    with the CPU kind or a 0.14% change of the embedding scale. For such a text the bar is the reference's own
    bf16 error, measured here on that text (the PyTorch bf16 model is loaded only when a text is below 0.9995).
    """
    texts, ref = reference
    got = real_model_bf16.encode(texts, batch_size=8)
    cos = _cos(got, ref)
    print(f"bf16 vs fp32 sentence-transformers: min cosine {cos.min():.6f} (text {int(np.argmin(cos))}), "
          f"median {np.median(cos):.6f}")
    assert np.median(cos) >= 0.9999
    below = [int(i) for i in np.flatnonzero(cos < 0.9995)]
    if below:
        import torch
        from sentence_transformers import SentenceTransformer

        st16 = SentenceTransformer(str(real_folder), device="cpu", model_kwargs={"torch_dtype": torch.bfloat16})
        st_cos = _cos(st16.encode([texts[i] for i in below], batch_size=1, convert_to_numpy=True).astype(np.float32),
                      ref[below])
        print("below 0.9995:", {i: (round(float(cos[i]), 6), round(float(c), 6)) for i, c in zip(below, st_cos)},
              "(this package, sentence-transformers bf16)")
        for i, c in zip(below, st_cos):
            assert cos[i] >= c, f"text {i}: bf16 cosine {cos[i]:.6f} < the reference's own bf16 {c:.6f}"


@pytest.mark.real
def test_model_card_red_planet(real_model, st_model):
    from embeddinggemma_jax.cli import DEMO_DOCUMENTS, DEMO_QUERY

    q = real_model.encode_query(DEMO_QUERY)
    d = real_model.encode_document(DEMO_DOCUMENTS)
    sims = real_model.similarity(q, d)[0]
    print("Red Planet similarities:", np.round(sims, 4).tolist())
    # The values sentence-transformers gives on these weights (the model card: 0.3011, 0.6359, 0.4930, 0.4889) ...
    np.testing.assert_allclose(sims, [0.3008, 0.6361, 0.4927, 0.4889], atol=1e-3)
    # ... and the live reference run.
    ref = st_model.similarity(st_model.encode_query(DEMO_QUERY), st_model.encode_document(DEMO_DOCUMENTS))
    np.testing.assert_allclose(sims, ref.numpy()[0], atol=1e-5)
