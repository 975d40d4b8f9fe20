"""Nothing lost, nothing silent: the user's folders are never replaced, bad input is refused with one
line that names the file, line or setting (the probes of issue "Nothing lost, nothing silent")."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embeddinggemma_jax import EmbeddingGemma
from embeddinggemma_jax.cli import main as cli_main
from embeddinggemma_jax.errors import EmbeddingGemmaError
from embeddinggemma_jax.io_utils import atomic_dir, umask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return EmbeddingGemma.from_pretrained(tiny_folder)


def precious_folder(path: Path) -> dict[str, bytes]:
    """A user's folder: a file and a subfolder. Returns its content, to compare after."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me")
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- data loss
def test_save_pretrained_refuses_a_folder_it_did_not_write(tiny, tmp_path):
    victim = tmp_path / "home"
    before = precious_folder(victim)
    with pytest.raises(FileExistsError, match="is not a model folder written by embeddinggemma-jax; refusing"):
        tiny.save_pretrained(victim)
    assert snapshot(victim) == before
    # A sentence-transformers folder this package did not write (e.g. downloaded) is not replaced either.
    downloaded = tmp_path / "downloaded"
    tiny.save_pretrained(downloaded)
    st_config = json.loads((downloaded / "config_sentence_transformers.json").read_text())
    del st_config["__version__"]
    (downloaded / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    with pytest.raises(FileExistsError, match="refusing to replace it"):
        tiny.save_pretrained(downloaded)
    # Its own earlier output is replaced; an empty folder is used.
    out = tmp_path / "out"
    tiny.save_pretrained(out)
    tiny.save_pretrained(out, dtype="bfloat16")
    (tmp_path / "empty").mkdir()
    tiny.save_pretrained(tmp_path / "empty")
    assert EmbeddingGemma.from_pretrained(tmp_path / "empty").encode("x").shape == (tiny.dimensions,)


def test_train_export_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    victim = tmp_path / "victim"
    before = precious_folder(victim)
    # Refused before the run's checkpoint is even read (there is none here).
    assert cli_main(["train-export", str(tmp_path / "run"), str(victim)]) == 1
    assert "is not a model folder written by embeddinggemma-jax; refusing to replace it" in one_error_line(capsys)
    assert snapshot(victim) == before


def test_a_killed_writers_staging_folders_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".tmp-ckpt-{dead.pid}-abcd1234", tmp_path / ".tmp-ckpt-k2j3h4g5",  # older name style
                 tmp_path / f".old-ckpt-{dead.pid}-x"]
        running = tmp_path / f".tmp-ckpt-{live.pid}-efgh5678"
        other = tmp_path / f".tmp-other-{dead.pid}-zzzz"
        for p in stale + [running, other]:
            p.mkdir()
            (p / "params.bin").write_bytes(b"x" * 1000)
        with atomic_dir(target) as staging:
            (staging / "done").write_text("ok")
        assert (target / "done").read_text() == "ok"
        assert not any(p.exists() for p in stale)
        assert running.exists() and other.exists()  # a live writer's, and another target's, are left alone
    finally:
        live.kill()


def test_written_files_get_the_usual_modes(tiny, tmp_path):
    want_file, want_dir = 0o666 & ~umask(), 0o777 & ~umask()
    out = tiny.save_pretrained(tmp_path / "exported")
    for rel in ("model.safetensors", "2_Dense/model.safetensors", "config.json", "tokenizer.json"):
        assert (out / rel).stat().st_mode & 0o777 == want_file, rel
    assert out.stat().st_mode & 0o777 == want_dir
    ckpt = tiny.save_checkpoint(tmp_path / "ckpt")
    assert (ckpt / "embeddinggemma_jax.json").stat().st_mode & 0o777 == want_file
    from embeddinggemma_jax.batch import shards

    shards.write_atomic(str(tmp_path / "job.json"), b"{}")
    assert (tmp_path / "job.json").stat().st_mode & 0o777 == want_file


# ----------------------------------------------------------------------------- silent acceptance
def test_titles_as_a_str_with_a_list_of_texts_is_refused(tiny):
    with pytest.raises(TypeError, match="titles is a str but texts is a list"):
        tiny.encode_document(["x", "y"], titles="ab")
    assert tiny.encode_document("x", titles="a").shape == (tiny.dimensions,)


def test_integer_weights_are_refused_naming_the_tensor(tiny_folder, tmp_path):
    from embeddinggemma_jax.safetensors_io import SafeTensorsFile, save_file

    bad = tmp_path / "int-weights"
    shutil.copytree(tiny_folder, bad)
    f = SafeTensorsFile(bad / "2_Dense" / "model.safetensors")
    w = np.asarray(f.get("linear.weight"))
    save_file({"linear.weight": (w * 100).astype(np.int32)}, bad / "2_Dense" / "model.safetensors")
    with pytest.raises(EmbeddingGemmaError, match=r"2_Dense/model.safetensors:linear.weight has dtype I32, not a "
                                                  r"float type"):
        EmbeddingGemma.from_pretrained(bad)


def test_a_model_without_a_normalize_module_is_not_normalised_by_default(tiny_folder, tmp_path, tiny):
    folder = tmp_path / "no-normalize"
    shutil.copytree(tiny_folder, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    m = EmbeddingGemma.from_pretrained(folder)
    assert m.head_config.normalize is False and tiny.head_config.normalize is True
    raw = m.encode(["some text", "another"])
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_array_equal(raw, tiny.encode(["some text", "another"], normalize=False))
    np.testing.assert_allclose(np.linalg.norm(m.encode(["some text"], normalize=True), axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- errors that say what is wrong
def _broken_copies(tiny_folder: Path, root: Path):
    """(name, folder, file the error must name) for each probe of a damaged model folder."""
    cases = []

    def copy(name):
        d = root / name
        shutil.copytree(tiny_folder, d)
        return d

    d = copy("config-not-json")
    (d / "config.json").write_text('{"model_type": ')
    cases.append(("config-not-json", d, d / "config.json"))
    d = copy("config-a-list")
    (d / "config.json").write_text("[1, 2]")
    cases.append(("config-a-list", d, d / "config.json"))
    d = copy("tokenizer-corrupt")
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500])
    cases.append(("tokenizer-corrupt", d, d / "tokenizer.json"))
    d = copy("no-2_Dense")
    shutil.rmtree(d / "2_Dense")
    cases.append(("no-2_Dense", d, d / "2_Dense" / "config.json"))
    d = copy("offsets-disagree")
    path = d / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start, end = header["embed_tokens.weight"]["data_offsets"]
    header["embed_tokens.weight"]["data_offsets"] = [start, end - 4]  # one float short of its shape
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    cases.append(("offsets-disagree", d, path))
    return cases


def test_damaged_model_folders_give_one_line_naming_the_file(tiny_folder, tmp_path, capsys):
    for name, folder, culprit in _broken_copies(tiny_folder, tmp_path):
        with pytest.raises(EmbeddingGemmaError) as e:
            EmbeddingGemma.from_pretrained(folder)
        msg = str(e.value)
        assert "\n" not in msg and str(culprit) in msg, (name, msg)
        assert cli_main(["encode", "--model", str(folder), "hello"]) == 1
        line = one_error_line(capsys)
        assert str(culprit) in line, (name, line)


def test_invalid_utf8_and_bad_batch_size_get_the_packages_message(tiny, tiny_folder, monkeypatch, capsys):
    bad = b"\xff".decode("utf-8", errors="surrogateescape")  # what Python makes of $'\xff' in argv
    assert cli_main(["encode", "--model", str(tiny_folder), "ok", bad]) == 1
    assert "TEXT argument 2 is not valid UTF-8" in one_error_line(capsys)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\n\xfe\xff\n")))
    assert cli_main(["encode", "--model", str(tiny_folder)]) == 1
    assert "stdin line 2 is not valid UTF-8" in one_error_line(capsys)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got True"):
        tiny.encode(["x"], batch_size=True)


def test_crlf_lines_on_stdin_embed_like_lf_lines(tiny, tiny_folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"first line\r\nsecond\r\nthird")))
    assert cli_main(["encode", "--model", str(tiny_folder)]) == 0
    got = np.asarray(json.loads(capsys.readouterr().out))
    np.testing.assert_allclose(got, tiny.encode(["first line", "second", "third"]), atol=1e-6)


def test_piping_into_head_exits_quietly(tiny_folder):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = (f"{sys.executable} -m embeddinggemma_jax.cli encode --model {tiny_folder} "
           + " ".join(f"text{i}" for i in range(400)) + " | head -c 20")
    r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)
    assert len(r.stdout) == 20 and r.stderr == "", r.stderr[-2000:]


# ----------------------------------------------------------------------------- smaller
@pytest.mark.real
def test_readme_prompt_names_are_the_models(real_folder):
    prompts = json.loads((Path(real_folder) / "config_sentence_transformers.json").read_text())["prompts"]
    readme = (ROOT / "docs" / "api.md").read_text()
    start = readme.index("`prompt_name`: any name in `model.prompts` (")
    listed = readme[start:readme.index(")", start)].split("(", 1)[1].replace("\n", " ")
    names = [n.strip() for n in listed.split(",")]
    assert sorted(names) == sorted(prompts), (names, sorted(prompts))
