"""Orbax checkpoints and two-way conversion: folder -> Orbax -> folder, atomic writes, refusals,
restore into an 8-device mesh, the QAT-style layouts, and the real weights (marked ``real``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conversion.convert import convert, export
from embeddinggemma_jax import EmbeddingGemma, checkpoint
from embeddinggemma_jax.cli import main as cli_main
from embeddinggemma_jax.config import FULL, SLIDING, EncoderConfig, HeadConfig
from embeddinggemma_jax.errors import WeightsError
from embeddinggemma_jax.safetensors_io import SafeTensorsFile, save_file
from embeddinggemma_jax.testing import make_tiny_folder

REPO = Path(__file__).resolve().parents[1]
TENSOR_FILES = ("model.safetensors", "2_Dense/model.safetensors", "3_Dense/model.safetensors")
TEXTS = ["hello world", "a longer sentence that is well past the tiny sliding window of eight tokens",
         "", "unicode: 東京 🙂 Москва"]


def assert_same_tensors(a: Path, b: Path, strip_prefix: str = "") -> None:
    """Every tensor of folder ``a`` equals the one in ``b`` bit for bit, same dtype, no extras."""
    for rel in TENSOR_FILES:
        fa, fb = SafeTensorsFile(a / rel), SafeTensorsFile(b / rel)
        keys_a = {k[len(strip_prefix):] if rel == "model.safetensors" and k.startswith(strip_prefix) else k: k
                  for k in fa.keys()}
        assert set(keys_a) == set(fb.keys()), rel
        for k, orig in keys_a.items():
            x, y = fa.get(orig), fb.get(k)
            assert x.dtype == y.dtype and x.shape == y.shape, (rel, k)
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (rel, k)


def convert_cli(src, out, *extra) -> None:
    assert cli_main(["convert", "--model", str(src), "--output", str(out), *extra]) == 0


def export_cli(ckpt, out, *extra) -> None:
    assert cli_main(["export", "--checkpoint", str(ckpt), "--output", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny.orbax"
    convert_cli(tiny_folder, out)
    return out


# ----------------------------------------------------------------------------- round trips (tiny)
def test_checkpoint_runs_without_the_source_folder(tiny_folder, tiny_ckpt, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_ckpt, moved)
    assert sorted(p.name for p in moved.iterdir()) == ["assets", "embeddinggemma_jax.json", "params"]
    a = EmbeddingGemma.from_pretrained(tiny_folder).encode(TEXTS, prompt_name="query")
    m = EmbeddingGemma.from_pretrained(moved)
    assert m.prompts == EmbeddingGemma.from_pretrained(tiny_folder).prompts and "query" in m.prompts
    np.testing.assert_array_equal(m.encode(TEXTS, prompt_name="query"), a)


def test_export_fp32_is_bit_identical_and_keeps_config_verbatim(tiny_folder, tiny_ckpt, tmp_path):
    out = tmp_path / "exported"
    export_cli(tiny_ckpt, out)
    assert_same_tensors(tiny_folder, out)
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_folder / "config.json").read_text())
    for rel in ("tokenizer.json", "config_sentence_transformers.json", "modules.json", "1_Pooling/config.json",
                "2_Dense/config.json", "3_Dense/config.json", "sentence_bert_config.json"):
        assert json.loads((out / rel).read_text()) == json.loads((tiny_folder / rel).read_text()), rel


def test_export_bf16_and_sentence_transformers_loads_it(tiny_folder, tiny_ckpt, tmp_path):
    import ml_dtypes
    import torch
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "exported-bf16"
    export_cli(tiny_ckpt, out, "--dtype", "bfloat16")
    orig = SafeTensorsFile(tiny_folder / "model.safetensors")
    got = SafeTensorsFile(out / "model.safetensors")
    for k in orig.keys():
        assert got.get(k).dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.get(k), orig.get(k).astype(ml_dtypes.bfloat16))
    st = SentenceTransformer(str(out), device="cpu")
    assert next(st.parameters()).dtype == torch.bfloat16
    ref = SentenceTransformer(str(tiny_folder), device="cpu").encode(TEXTS)
    got = st.encode(TEXTS).astype(np.float32)
    # Exactness is asserted on the tensors above; torch's own bf16 arithmetic on a random tiny model
    # moves the embeddings by ~1e-3, so this only shows it is the same model (unrelated ones: ~0).
    assert np.isfinite(got).all() and np.sum(got * ref, axis=1).min() > 0.99


def test_bf16_parameters_restore(tiny_folder, tmp_path):
    out = tmp_path / "bf16.orbax"
    convert_cli(tiny_folder, out, "--param-dtype", "bfloat16")
    from embeddinggemma_jax.weights import iter_params

    got = dict(iter_params(EmbeddingGemma.from_pretrained(out, dtype="bfloat16").state))
    ref = dict(iter_params(EmbeddingGemma.from_pretrained(tiny_folder, dtype="bfloat16").state))
    assert got.keys() == ref.keys()
    for path, var in got.items():
        assert str(var.get_value().dtype) == "bfloat16", path
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref[path].get_value()))


def _prefixed_folder(src: Path, dst: Path) -> Path:
    """The same model with its encoder keys under ``model.`` (transformers' Gemma3Model naming)."""
    shutil.copytree(src, dst)
    f = SafeTensorsFile(src / "model.safetensors")
    save_file({"model." + k: np.array(f.get(k)) for k in f.keys()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout", ["model-prefix", "other-pattern"])
def test_variant_layouts_round_trip(layout, tiny_folder, tmp_path):
    """The QAT checkpoints share the base layout; these stand in for the variants seen in the wild."""
    from sentence_transformers import SentenceTransformer

    if layout == "model-prefix":
        src, prefix = _prefixed_folder(tiny_folder, tmp_path / "src"), "model."
    else:
        enc = EncoderConfig.tiny(num_layers=5, layer_types=(SLIDING, FULL, SLIDING, SLIDING, FULL),
                                 sliding_window=12, rope_local_base_freq=5000.0)
        src, prefix = make_tiny_folder(tmp_path / "src", seed=3, enc=enc,
                                       head=HeadConfig.tiny(enc, hidden_features=101, out_features=37)), ""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    convert_cli(src, ckpt)
    export_cli(ckpt, out)
    assert_same_tensors(src, out, strip_prefix=prefix)
    jax_emb = EmbeddingGemma.from_pretrained(ckpt).encode(TEXTS)
    ref = SentenceTransformer(str(src), device="cpu").encode(TEXTS)
    back = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    np.testing.assert_array_equal(back, ref)
    assert np.sum(jax_emb * ref, axis=1).min() >= 0.99999


# ----------------------------------------------------------------------------- atomic writes
def test_interrupted_convert_leaves_no_checkpoint(tiny_folder, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", boom)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_folder, out)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_no_folder(tiny_ckpt, tmp_path, monkeypatch):
    import embeddinggemma_jax.export as export_module

    calls = []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*a, **k)

    monkeypatch.setattr(export_module, "save_file", fail_second)
    with pytest.raises(OSError):
        export(tiny_ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "copy.orbax"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _refused(folder, *words):
    with pytest.raises(WeightsError) as e:
        EmbeddingGemma.from_pretrained(folder)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_truncated_data_file_is_refused(ckpt_copy):
    data = max((p for p in (ckpt_copy / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _refused(ckpt_copy, "truncated or damaged")


def test_missing_orbax_metadata_is_refused(ckpt_copy):
    (ckpt_copy / "params" / "_CHECKPOINT_METADATA").unlink()
    _refused(ckpt_copy, "params")


def test_missing_params_is_refused(ckpt_copy):
    shutil.rmtree(ckpt_copy / "params")
    _refused(ckpt_copy, "incomplete", "params")


def test_params_from_another_checkpoint_are_refused(ckpt_copy, tiny_folder, tmp_path):
    """Same config, other weights (e.g. a QAT variant): only the fingerprint can tell."""
    other_src = make_tiny_folder(tmp_path / "other", seed=7)
    other = tmp_path / "other.orbax"
    convert_cli(other_src, other)
    shutil.rmtree(ckpt_copy / "params")
    shutil.copytree(other / "params", ckpt_copy / "params")
    _refused(ckpt_copy, "mixed up")


def test_params_of_another_config_are_refused(ckpt_copy, tmp_path):
    enc = EncoderConfig.tiny(num_layers=2, layer_types=(SLIDING, FULL))
    other = tmp_path / "other.orbax"
    convert_cli(make_tiny_folder(tmp_path / "other", enc=enc), other)
    shutil.copy(other / "assets" / "config.json", ckpt_copy / "assets" / "config.json")
    _refused(ckpt_copy, "mixed up")


def test_edited_marker_is_refused(ckpt_copy):
    marker = json.loads((ckpt_copy / checkpoint.MARKER).read_text())
    marker["encoder"]["sliding_window"] = 16
    (ckpt_copy / checkpoint.MARKER).write_text(json.dumps(marker))
    _refused(ckpt_copy, "fingerprint")


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(format="something-else"), ["does not describe an embeddinggemma-jax checkpoint"]),
    (lambda m: m.update(format_version=99), ["format version 99"]),
])
def test_foreign_marker_is_refused(ckpt_copy, edit, words):
    marker = json.loads((ckpt_copy / checkpoint.MARKER).read_text())
    edit(marker)
    (ckpt_copy / checkpoint.MARKER).write_text(json.dumps(marker))
    _refused(ckpt_copy, *words)


def test_export_of_a_non_checkpoint_is_one_clear_line(tiny_folder, tmp_path, capsys):
    assert cli_main(["export", "--checkpoint", str(tiny_folder), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a sentence-transformers folder" in err and "convert" in err
    assert not (tmp_path / "o").exists()


def test_convert_refuses_to_replace_an_unrelated_folder(tiny_folder, tmp_path, capsys):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    assert cli_main(["convert", "--model", str(tiny_folder), "--output", str(victim)]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert (victim / "notes.txt").read_text() == "keep me"


def test_convert_replaces_an_older_checkpoint(tiny_folder, tiny_ckpt, tmp_path):
    out = tmp_path / "again.orbax"
    shutil.copytree(tiny_ckpt, out)
    old_id = json.loads((out / checkpoint.MARKER).read_text())["checkpoint_id"]
    convert_cli(tiny_folder, out)
    assert json.loads((out / checkpoint.MARKER).read_text())["checkpoint_id"] != old_id
    EmbeddingGemma.from_pretrained(out)


# ----------------------------------------------------------------------------- sharded restore
SHARDED_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    from embeddinggemma_jax import EmbeddingGemma, sharding
    from embeddinggemma_jax.weights import iter_params
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh((4, 2))
    m = EmbeddingGemma.from_pretrained(sys.argv[1], mesh=mesh, rules=sharding.FSDP_RULES)
    ref = EmbeddingGemma.from_pretrained(sys.argv[1])
    split = 0
    for path, var in iter_params(m.state):
        a = var.get_value()
        assert a.sharding.mesh.shape == mesh.shape, path
        assert len(a.addressable_shards) == 8, path
        shard = a.addressable_shards[0].data.shape
        if "fsdp" in [ax for ax in a.sharding.spec if ax]:
            split += 1
            assert int(np.prod(shard)) * 2 == a.size, (path, shard, a.shape)  # each device: its half only
        np.testing.assert_array_equal(np.asarray(a), np.asarray(dict(iter_params(ref.state))[path].get_value()))
    assert split >= 4, split  # embed_tokens, gate/up/down, dense1/dense2
    texts = ["sharded restore", "x" * 40]
    np.testing.assert_allclose(m.encode(texts), ref.encode(texts), atol=2e-6)
    print("OK", split)
""")


def test_restore_into_8_device_mesh(tmp_path):
    # Sizes divisible by the fsdp axis (2) so the FSDP rules really split parameters.
    enc = EncoderConfig.tiny(vocab_size=264, intermediate_size=72)
    src = make_tiny_folder(tmp_path / "src", enc=enc, head=HeadConfig.tiny(enc, hidden_features=188))
    ckpt = tmp_path / "ckpt"
    convert_cli(src, ckpt)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(ckpt)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


# ----------------------------------------------------------------------------- real weights
@pytest.fixture(scope="session")
def real_ckpt(real_folder, tmp_path_factory):
    """One conversion of the real weights shared by the real tests: folder -> Orbax -> export."""
    root = tmp_path_factory.mktemp("real-conversion")
    convert_cli(real_folder, root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="session")
def real_exported(real_ckpt):
    out = real_ckpt.parent / "exported"
    export_cli(real_ckpt, out)
    return out


@pytest.mark.real
def test_real_export_is_bit_identical(real_folder, real_exported):
    assert_same_tensors(real_folder, real_exported)
    cfg = json.loads((real_exported / "config.json").read_text())
    assert cfg == json.loads((real_folder / "config.json").read_text())
    assert cfg["sliding_window"] == 512


@pytest.mark.real
@pytest.mark.slow
def test_real_round_trip_sentence_transformers(real_folder, real_exported, st_model):
    """folder -> Orbax -> export -> SentenceTransformer against the original folder, on the built-in
    parity texts up to 600 tokens (258 and 513 included: both sides of the sliding window). The tensors and
    config are proven bit-identical by test_real_export_is_bit_identical, so longer texts would only
    re-test sentence-transformers; this test proves the exported folder's other files (modules, Dense
    layers, prompts, tokenizer) load into the same SentenceTransformer."""
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from conversion.parity import builtin_cases

    tok = Tokenizer.from_file(str(real_exported / "tokenizer.json"))
    texts = [t for _, t in builtin_cases(lambda t: len(tok.encode(t).ids), 2048)]
    texts = [t for t in texts if len(tok.encode(t).ids) <= 600]
    assert len(texts) >= 10 and max(len(tok.encode(t).ids) for t in texts) > 512
    back = SentenceTransformer(str(real_exported), device="cpu")
    a = back.encode(texts, batch_size=4)
    b = st_model.encode(texts, batch_size=4)
    cos = np.sum(a.astype(np.float64) * b, axis=1)
    print("round trip cosine min", cos.min(), "median", np.median(cos))
    assert cos.min() >= 0.99999
