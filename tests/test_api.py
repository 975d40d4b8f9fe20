"""The embedding API's rules (tiny model, fast) and its agreement with sentence-transformers (real weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from embeddinggemma_jax import EmbeddingGemma
from embeddinggemma_jax.batching import BatchPlanner


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return EmbeddingGemma.from_pretrained(tiny_folder)


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- shapes and types
def test_shapes_and_dtypes(tiny):
    d = tiny.dimensions
    one = tiny.encode("hello")
    assert one.shape == (d,) and one.dtype == np.float32
    many = tiny.encode(["hello", "world", "again"])
    assert many.shape == (3, d) and many.dtype == np.float32
    empty = tiny.encode([])
    assert empty.shape == (0, d) and empty.dtype == np.float32
    assert tiny.encode([], dimensions=32).shape == (0, 32)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(one, tiny.encode(["hello"])[0])


def test_order_preserved_after_bucketing(tiny):
    rng = np.random.default_rng(0)
    texts = ["w" * int(n) for n in rng.integers(0, 120, 37)]
    batched = tiny.encode(texts, batch_size=4)
    single = np.stack([tiny.encode(t) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    # different texts give different vectors, so a permutation would be caught
    assert len({round(float(x), 5) for x in batched[:, 0]}) > 30


def test_batches_are_sorted_bucketed_and_complete(tiny):
    ids = tiny.tokenizer.encode(["a" * n for n in (3, 100, 17, 50, 0, 64)])
    batches = BatchPlanner(tiny.length_buckets, 2).batches(ids)
    seen = np.concatenate([b.index for b in batches])
    assert sorted(seen.tolist()) == list(range(6))
    for b in batches:
        assert b.ids.shape[1] in tiny.length_buckets
        assert b.ids.shape[0] in (1, 2)
        for r, i in enumerate(b.index):
            n = len(ids[i])
            assert b.mask[r].sum() == n and (b.ids[r, :n] == ids[i]).all() and (b.ids[r, n:] == 0).all()


def test_max_tokens_caps_rows_times_length():
    capped = BatchPlanner((16, 64, 128, 300, 512, 2048, 4096), 32, max_tokens=2048)
    assert [capped.full_rows(L) for L in (16, 64, 128, 300, 512, 2048)] == [32, 32, 16, 4, 4, 1]
    assert capped.full_rows(4096) == 1  # a text longer than the cap still gets its row
    assert BatchPlanner((512,), 32).full_rows(512) == 32
    rng = np.random.default_rng(5)
    ids = [list(range(2, 2 + int(n))) for n in rng.integers(1, 300, 50)]
    buckets = (16, 32, 64, 128, 256, 512)
    for cap in (None, 1, 64, 100, 1000):
        batches = BatchPlanner(buckets, 8, max_tokens=cap).batches(ids)
        assert sorted(np.concatenate([b.index for b in batches]).tolist()) == list(range(50))
        for b in batches:
            rows, L = b.ids.shape
            assert rows <= 8 and rows & (rows - 1) == 0  # powers of two (8 is one): few shapes to compile
            if cap is not None:
                assert rows * L <= max(cap, L), (cap, b.ids.shape)
        # A bucket's last batch hands its spare rows to the next, shorter texts: rows of pure padding
        # appear only in the very last batch.
        assert [k for k, b in enumerate(batches) if (b.mask.sum(1) == 0).any()] in ([], [len(batches) - 1])
        assert [b.ids.shape[1] for b in batches] == sorted((b.ids.shape[1] for b in batches), reverse=True)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive integer"):
        BatchPlanner(buckets, 8, max_tokens=0)


def test_max_batch_tokens_changes_batches_not_embeddings(tiny_folder, tiny):
    assert tiny.max_batch_tokens == 2048  # the CPU default ("auto")
    capped = EmbeddingGemma.from_pretrained(tiny_folder, max_batch_tokens=64)
    uncapped = EmbeddingGemma.from_pretrained(tiny_folder, max_batch_tokens=None)
    rng = np.random.default_rng(6)
    texts = ["z" * int(n) for n in rng.integers(0, 150, 40)]
    ids = capped.tokenizer.encode(texts)
    assert {b.ids.shape for b in capped.batches(ids, 16)} != {b.ids.shape for b in uncapped.batches(ids, 16)}
    assert all(b.ids.size <= max(64, b.ids.shape[1]) for b in capped.batches(ids, 16))
    np.testing.assert_allclose(capped.encode(texts, batch_size=16), uncapped.encode(texts, batch_size=16), atol=1e-6)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        EmbeddingGemma.from_pretrained(tiny_folder, max_batch_tokens=-5)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        capped.max_batch_tokens = "2048"
    capped.max_batch_tokens = "auto"
    assert capped.max_batch_tokens == 2048


# --------------------------------------------------------------------------- prompts and titles
def test_prompt_name_and_prompt(tiny):
    texts = ["alpha", "beta"]
    q = tiny.encode(texts, prompt_name="query")
    manual = tiny.encode([tiny.prompts["query"] + t for t in texts])
    np.testing.assert_array_equal(q, manual)
    np.testing.assert_array_equal(tiny.encode_query(texts), q)
    custom = tiny.encode(texts, prompt="Represent this: ")
    np.testing.assert_array_equal(custom, tiny.encode(["Represent this: " + t for t in texts]))
    assert not np.allclose(custom, tiny.encode(texts))
    with pytest.raises(ValueError, match="either prompt_name or prompt"):
        tiny.encode(texts, prompt_name="query", prompt="x: ")
    with pytest.raises(ValueError, match="valid names: document, query"):
        tiny.encode(texts, prompt_name="nope")


def test_document_titles(tiny):
    texts = ["body one", "body two", "body three"]
    got = tiny.encode_document(texts, titles=["First", None, "Third"])
    want = tiny.encode(["title: First | text: body one", "title: none | text: body two",
                        "title: Third | text: body three"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(tiny.encode_document(texts), tiny.encode(texts, prompt_name="document"))
    with pytest.raises(ValueError, match="titles has 2 entries for 3 texts"):
        tiny.encode_document(texts, titles=["a", "b"])
    with pytest.raises(TypeError, match="title at index 1"):
        tiny.encode_document(texts, titles=["a", 3, "c"])


# --------------------------------------------------------------------------- dimensions, normalisation
def test_matryoshka_truncation_renormalises(tiny):
    texts = ["one", "two words", "three little words"]
    full = tiny.encode(texts)
    for d in (32, 39):
        cut = tiny.encode(texts, dimensions=d)
        assert cut.shape == (3, d)
        np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(cut, _l2(full[:, :d]), atol=1e-6)
    raw = tiny.encode(texts, dimensions=32, normalize=False)
    np.testing.assert_allclose(raw, tiny.encode(texts, normalize=False)[:, :32], atol=1e-6)


def test_zero_padding_above_native_size(tiny):
    full = tiny.encode(["pad me"])
    for d in (100, 8192):
        padded = tiny.encode(["pad me"], dimensions=d)
        assert padded.shape == (1, d)
        np.testing.assert_array_equal(padded[:, :tiny.dimensions], full)
        assert not padded[:, tiny.dimensions:].any()
    np.testing.assert_array_equal(tiny.encode(["pad me"], dimensions=tiny.dimensions), full)


@pytest.mark.parametrize("bad", [31, 0, -5, 8193, 10_000, 1.5, "64", True])
def test_bad_dimensions(tiny, bad):
    with pytest.raises(ValueError, match="dimensions"):
        tiny.encode(["x"], dimensions=bad)


def test_normalize_false_is_the_dense_output(tiny):
    raw = tiny.encode(["some text", "other"], normalize=False)
    norms = np.linalg.norm(raw, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)
    np.testing.assert_allclose(_l2(raw), tiny.encode(["some text", "other"]), atol=1e-6)


def test_similarity_is_cosine(tiny):
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    s = EmbeddingGemma.similarity(a, b)
    np.testing.assert_allclose(s, [[1, 0, -np.sqrt(0.5)], [np.sqrt(0.5), np.sqrt(0.5), -1]], atol=1e-6)
    assert EmbeddingGemma.similarity(a[0], b[0]).shape == (1, 1)


# --------------------------------------------------------------------------- errors and truncation
def test_type_errors_name_the_index(tiny):
    with pytest.raises(TypeError, match="index 2"):
        tiny.encode(["a", "b", 3])
    with pytest.raises(TypeError, match="index 0"):
        tiny.encode([None])
    with pytest.raises(TypeError):
        tiny.encode(42)


def test_truncation_keeps_eos_and_truncate_false_raises(tiny):
    limit = tiny.head_config.max_seq_length
    long = "z" * (limit + 50)
    ids = tiny.tokenizer.encode([long])[0]
    assert len(ids) == limit and ids[0] == 2 and ids[-1] == 1
    short = ["z" * n for n in (0, 5, limit - 2, limit - 1)]
    assert tiny.tokenizer.count([long, *short]) == [len(x) for x in tiny.tokenizer.encode([long, *short])]
    np.testing.assert_array_equal(tiny.encode(long), tiny.encode("z" * (limit - 2)))
    with pytest.raises(ValueError, match="truncate=True"):
        tiny.encode([long], truncate=False)
    tiny.encode(["z" * (limit - 2)], truncate=False)  # exactly at the limit is fine


def test_float16_is_refused(tiny_folder):
    with pytest.raises(ValueError, match="overflow"):
        EmbeddingGemma.from_pretrained(tiny_folder, dtype="float16")


def test_compiles_once_per_bucket_shape(tiny_folder):
    model = EmbeddingGemma.from_pretrained(tiny_folder)
    rng = np.random.default_rng(3)
    texts = ["q" * int(n) for n in rng.lognormal(3.0, 1.0, 200).clip(0, 200)]
    batches = model.batches(model.tokenizer.encode(texts), 16)
    shapes = {b.ids.shape for b in batches}
    assert len(batches) > len(shapes)  # several batches share a shape
    model.encode(texts, batch_size=16)
    assert model.compile_count <= len(shapes)
    assert len({L for _, L in shapes}) <= len(model.length_buckets)
    before = model.compile_count
    model.encode(list(reversed(texts)), batch_size=16)
    assert model.compile_count == before, "a second call over the same buckets must not recompile"


# --------------------------------------------------------------------------- command line
def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "embeddinggemma_jax.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_cli_encode_and_demo(tiny_folder, tiny):
    r = _cli("encode", "hello", "world", "--model", str(tiny_folder), "--dimensions", "32")
    assert r.returncode == 0, r.stderr
    out = np.asarray(json.loads(r.stdout))
    np.testing.assert_allclose(out, tiny.encode(["hello", "world"], dimensions=32), atol=1e-6)
    r = _cli("encode", "--model", str(tiny_folder), "--prompt-name", "query", "--no-normalize", stdin="a\nb\n")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.asarray(json.loads(r.stdout)),
                               tiny.encode(["a", "b"], prompt_name="query", normalize=False), atol=1e-5)
    r = _cli("demo", "--model", str(tiny_folder))
    assert r.returncode == 0, r.stderr
    assert "query embedding shape: (40,)" in r.stdout and "similarities: [" in r.stdout


def test_cli_errors_are_one_line(tiny_folder, tmp_path):
    for args in (["encode", "x", "--model", str(tmp_path / "missing")],
                 ["encode", "x", "--model", str(tiny_folder), "--dimensions", "5"],
                 ["encode", "x", "--model", str(tiny_folder), "--prompt-name", "nope"]):
        r = _cli(*args)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_cli_help_for_every_command():
    from embeddinggemma_jax.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"demo", "encode"} <= set(sub.choices)
    for name in [None, *sub.choices]:
        r = _cli(*([name] if name else []), "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (name, r.stderr)


def test_library_never_imports_torch(tiny_folder):
    code = ("import sys; from embeddinggemma_jax import EmbeddingGemma; "
            f"m = EmbeddingGemma.from_pretrained({str(tiny_folder)!r}); m.encode(['x']); "
            "import embeddinggemma_jax.cli; assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- real weights vs sentence-transformers
REAL_TEXTS = ["How do I bake sourdough bread?", "Les réseaux de neurones apprennent des représentations.",
              "def add(a, b):\n    return a + b", "量子コンピュータとは何ですか"]


def _cos(a, b):
    return np.sum(_l2(a) * _l2(b), axis=-1)


@pytest.mark.real
def test_real_api_matches_sentence_transformers(real_model, st_model):
    checks = {
        "encode_query": (real_model.encode_query(REAL_TEXTS), st_model.encode_query(REAL_TEXTS)),
        "encode_document": (real_model.encode_document(REAL_TEXTS), st_model.encode_document(REAL_TEXTS)),
        "prompt_name=STS": (real_model.encode(REAL_TEXTS, prompt_name="STS"),
                            st_model.encode(REAL_TEXTS, prompt_name="STS")),
        "prompt=": (real_model.encode(REAL_TEXTS, prompt="Custom instruction: "),
                    st_model.encode(REAL_TEXTS, prompt="Custom instruction: ")),
    }
    for name, (got, ref) in checks.items():
        assert _cos(got, ref).min() >= 0.99999, name
    assert set(st_model.prompts) == set(real_model.prompts)
    assert all(st_model.prompts[k] == v for k, v in real_model.prompts.items())


@pytest.mark.real
def test_real_truncate_dim_matches_sentence_transformers(real_model, st_model):
    for d in (512, 256, 128):
        ref = st_model.encode(REAL_TEXTS, truncate_dim=d)  # sliced, not renormalised
        got = real_model.encode(REAL_TEXTS, dimensions=d)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
        assert _cos(got, ref).min() >= 0.99999
        np.testing.assert_allclose(got, _l2(ref), atol=1e-4)


# --------------------------------------------------------------------------- sentence-transformers' spellings
def test_sentence_transformers_spellings_equal_sentence_transformers(tiny_folder, tmp_path):
    """``truncate_dim``, ``normalize_embeddings``, ``convert_to_*``, ``get_sentence_embedding_dimension`` and
    ``default_prompt_name`` do what sentence-transformers does with the same folder (a copy whose config names a
    default prompt)."""
    import shutil

    import jax
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "with-default-prompt"
    shutil.copytree(tiny_folder, folder)
    cfg_path = folder / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text())
    assert "query" in cfg["prompts"]
    cfg["default_prompt_name"] = "query"
    cfg_path.write_text(json.dumps(cfg))
    ours, st = EmbeddingGemma.from_pretrained(folder), SentenceTransformer(str(folder), device="cpu")
    texts = ["hello world", "a somewhat longer sentence about planets", "x"]
    st_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    assert ours.get_embedding_dimension() == ours.get_sentence_embedding_dimension() == st_dim()
    for kw in ({}, {"truncate_dim": 16}, {"truncate_dim": 16, "normalize_embeddings": True},
               {"normalize_embeddings": True, "prompt_name": "document"}, {"prompt": "custom: "}):
        want = st.encode(texts, **kw)
        got = ours.encode(texts, **kw)
        assert got.shape == want.shape, kw
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=str(kw))
    # the default prompt really applies: without it the vectors differ
    assert not np.allclose(ours.encode(texts), ours.encode(texts, prompt=""), atol=1e-4)
    as_tensor = ours.encode(texts, convert_to_tensor=True, show_progress_bar=True)
    assert isinstance(as_tensor, jax.Array) and as_tensor.shape == (3, ours.dimensions)
    as_list = ours.encode(texts, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 3 and as_list[0].shape == (ours.dimensions,)
    with pytest.raises(ValueError, match="not both"):
        ours.encode(texts, dimensions=32, truncate_dim=32)
    with pytest.raises(ValueError, match="truncate_dim must be"):
        ours.encode(texts, truncate_dim=0)


def test_cli_help_and_version_import_no_heavy_module():
    """`embeddinggemma-jax --help` lists every command without importing JAX, Orbax or Optax (each command's
    module loads only when that command runs); `--version` prints the package version."""
    from embeddinggemma_jax.version import __version__

    code = ("import sys\nfrom embeddinggemma_jax.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('jax', 'flax', 'orbax.checkpoint', 'optax', 'torch') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "tpu-compile" in r.stdout and "HEAVY []" in r.stdout, (r.stdout[-500:], r.stderr)
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"embeddinggemma-jax {__version__}", r


def test_one_prompt_helper_for_names_custom_prompts_and_titles():
    """``prompts``: the one home of prompt choice; the error names the caller's spelling and the valid names."""
    from embeddinggemma_jax.errors import JobError
    from embeddinggemma_jax.prompts import document_prefix, prompt_text, with_prompt

    prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}
    assert prompt_text(prompts, "query") == prompts["query"]
    assert prompt_text(prompts, None, "custom: ") == "custom: " and prompt_text(prompts) is None
    assert with_prompt(["a", "b"], "p: ") == ["p: a", "p: b"] and with_prompt(["a"], "") == ["a"]
    assert document_prefix(None) == prompts["document"] and document_prefix("T") == "title: T | text: "
    with pytest.raises(JobError, match=r"^unknown --prompt-name 'nope'; valid names: document, query$"):
        prompt_text(prompts, "nope", what="--prompt-name", error=JobError)
    with pytest.raises(ValueError, match="not both"):
        prompt_text(prompts, "query", "custom")
    with pytest.raises(TypeError, match="prompt must be a str"):
        prompt_text(prompts, None, 3)
