"""The ``parity`` command: passes on a faithful model, fails (exit 1) on a broken one and names the
broken layer with ``--layers``; the built-in case set hits the lengths where ports break; and the
real weights pass through an Orbax checkpoint (marked ``real``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conversion.parity import LAYER_TOLERANCE, builtin_cases, first_jump, read_texts
from embeddinggemma_jax.cli import main as cli_main
from embeddinggemma_jax.safetensors_io import SafeTensorsFile, save_file


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main(["parity", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def broken_copy(src: Path, dst: Path, layer: int) -> Path:
    """``src`` with layer ``layer``'s four norm weights zeroed (the stored value is an offset: 1 + w)."""
    shutil.copytree(src, dst)
    f = SafeTensorsFile(src / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    zeroed = [k for k in tensors if k.startswith(f"layers.{layer}.") and k.endswith("layernorm.weight")]
    assert len(zeroed) == 4
    for k in zeroed:
        tensors[k] = np.zeros_like(tensors[k])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_parity_passes_on_a_checkpoint(tiny_folder, tmp_path, capsys):
    ckpt = tmp_path / "tiny.orbax"
    assert cli_main(["convert", "--model", str(tiny_folder), "--output", str(ckpt)]) == 0
    report = tmp_path / "report.json"
    rc, out, err = run(capsys, "--model", ckpt, "--builtin", "--report", report)
    assert rc == 0, out + err
    r = json.loads(report.read_text())
    assert r["passed"] and len(r["cases"]) == 15
    assert r["summary"]["min_cosine"] >= 0.99999
    assert "summary:" in out and "PASS" in out and "worst:" in out


LAYER_TEXTS = ["short", "a text longer than the tiny model's sliding window of eight tokens", "Москва 東京 " * 6]


def test_layers_are_clean_on_a_faithful_model(tiny_folder, tmp_path, capsys):
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(LAYER_TEXTS))
    report = tmp_path / "report.json"
    rc, out, err = run(capsys, "--model", tiny_folder, "--texts", texts, "--layers", "--report", report)
    assert rc == 0, out + err
    r = json.loads(report.read_text())
    assert r["layers"]["first_jump"] is None and len(r["layers"]["relative_error"]) == 5
    assert max(r["layers"]["relative_error"]) < LAYER_TOLERANCE["float32"]
    assert "no layer's error exceeds the tolerance" in out


def test_parity_fails_on_a_broken_model_and_names_the_layer(tiny_folder, tmp_path, capsys):
    broken = broken_copy(tiny_folder, tmp_path / "broken", layer=2)
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(LAYER_TEXTS))
    report = tmp_path / "report.json"
    rc, out, err = run(capsys, "--model", broken, "--reference", tiny_folder, "--texts", texts, "--layers",
                       "--report", report)
    assert rc == 1
    assert "FAIL" in err
    r = json.loads(report.read_text())
    assert not r["passed"] and r["summary"]["min_cosine"] < 0.99999
    assert r["layers"]["first_jump"]["layer"] == 2
    assert "first layer whose error jumps: layer 2 (layers.2)" in out
    rel = r["layers"]["relative_error"]
    assert max(rel[:3]) < LAYER_TOLERANCE["float32"] < rel[3]  # embedding, layers 0-1 clean; layer 2 not


def test_texts_file_prompt_and_threshold_gate(tiny_folder, tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps(x) for x in [{"name": "q1", "text": "where is Mars?"}, "plain string"]))
    report = tmp_path / "r.json"
    rc, out, err = run(capsys, "--model", tiny_folder, "--texts", texts, "--prompt-name", "query",
                       "--min-cosine", "1.5", "--report", report)
    assert rc == 1  # no cosine reaches 1.5: the gate must trip
    r = json.loads(report.read_text())
    assert [c["name"] for c in r["cases"]] == ["q1", "text-1"] and r["prompt_name"] == "query"
    assert r["summary"]["min_cosine"] >= 0.99999  # but the model itself agrees
    # the prompt's tokens are counted: byte-level tokenizer, one token per byte plus <bos>/<eos>
    assert r["cases"][0]["tokens"] == len(("task: search result | query: where is Mars?").encode()) + 2


def test_unknown_prompt_name_is_one_line(tiny_folder, capsys):
    rc, out, err = run(capsys, "--model", tiny_folder, "--prompt-name", "nope")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "unknown --prompt-name 'nope'" in err


def test_first_jump():
    assert first_jump([0.0, 1e-7, 2e-7, 0.3, 0.5], 1e-3) == 3
    assert first_jump([0.0, 1e-7, 2e-7], 1e-3) is None
    assert first_jump([0.0, float("nan")], 1e-3) == 1


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    assert read_texts(tmp_path / "a.json") == [("text-0", "x"), ("text-1", "y")]
    assert read_texts(tmp_path / "b.txt") == [("text-0", "one"), ("text-1", "two")]
    (tmp_path / "c.json").write_text(json.dumps([1]))
    with pytest.raises(ValueError, match="entry 0"):
        read_texts(tmp_path / "c.json")


@pytest.mark.real
def test_builtin_lengths_with_the_real_tokenizer(real_folder):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(real_folder / "tokenizer.json"))
    tok.no_truncation()
    cases = dict(builtin_cases(lambda t: len(tok.encode(t).ids), 2048))
    n = {k: len(tok.encode(v).ids) for k, v in cases.items()}
    assert 12 <= len(cases) <= 16
    assert 257 < n["len-258 (sliding window + 1)"] <= 258  # past the 257-token window
    assert 512 < n["len-513 mixed scripts"] <= 513
    assert 2040 <= n["len-2048 (the limit)"] <= 2048
    assert n["len-4000 repetitive (truncated)"] > 2048  # truncated by both sides
    assert n["empty"] == 2


@pytest.mark.real
@pytest.mark.slow
def test_parity_command_on_the_real_weights(real_folder, tmp_path, capsys):
    """The CI gate, by hub id (resolved from the cache), over the full built-in set. The Orbax and
    exported-folder paths on the real weights are covered by test_conversion's round trip."""
    report = tmp_path / "real.json"
    rc, out, err = run(capsys, "--model", "google/embeddinggemma-300m", "--builtin", "--report", report)
    print(out)
    r = json.loads(report.read_text())
    assert rc == 0, out + err
    assert r["summary"]["min_cosine"] >= 0.99999
    assert max(c["tokens"] for c in r["cases"]) == 2048
