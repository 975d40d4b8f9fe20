"""Settings declared once: flags and config keys derived from dataclass fields (``options``)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from embeddinggemma_jax import options
from embeddinggemma_jax.options import ints, option


@dataclasses.dataclass(frozen=True)
class Inner:
    depth: int = option(3, "how deep")


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = option(None, "a required name", required=True)
    rate: float = option(0.5, "a rate", flag="--lr")
    dims: tuple[int, ...] = option((8, 4), "dims", parse=ints)
    fast: bool = option(True, "go fast")
    inner: Inner = dataclasses.field(default_factory=Inner)


def parse(argv):
    p = argparse.ArgumentParser()
    options.add_arguments(p, Toy)
    return p.parse_args(argv)


def test_flags_come_from_the_fields():
    args = parse(["--name", "x", "--lr", "0.1", "--dims", "16,2", "--no-fast", "--depth", "7"])
    assert options.build(Toy, args) == Toy("x", 0.1, (16, 2), False, Inner(7))
    assert vars(parse(["--name", "x"])) == {"name": "x"}  # only what was given reaches the namespace


def test_defaults_then_config_then_flags_and_a_flag_may_restore_a_default(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"_comment": "ignored", "name": "from-file", "lr": 0.9, "dims": [1, 2], "depth": 5}))
    values = options.read_config(cfg, Toy)
    assert options.build(Toy, parse([]), values) == Toy("from-file", 0.9, (1, 2), True, Inner(5))
    # --lr 0.5 is the default, and still wins over the file (the old parser could not do this)
    got = options.build(Toy, parse(["--lr", "0.5", "--name", "cli"]), values)
    assert got.rate == 0.5 and got.name == "cli" and got.inner.depth == 5
    assert options.flat_dict(got) == {"name": "cli", "lr": 0.5, "dims": [1, 2], "fast": True, "depth": 5}


def test_bad_configs_and_missing_required_values_are_one_line_errors(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"rate": 1}')  # the field name, not the flag's
    with pytest.raises(ValueError, match=r"config file .*c.json has unknown keys \['rate'\]; use the flag names"):
        options.read_config(cfg, Toy)
    cfg.write_text("[1]")
    with pytest.raises(ValueError, match="c.json holds a JSON list, not an object"):
        options.read_config(cfg, Toy)
    with pytest.raises(ValueError, match="--name is required"):
        options.build(Toy, parse([]))


def test_train_and_embed_flags_are_their_dataclasses():
    from embeddinggemma_jax.batch.job import EmbedOptions
    from embeddinggemma_jax.cli import build_parser
    from embeddinggemma_jax.train.cli import run_config

    args = build_parser().parse_args(["train", "--train-file", "t.jsonl", "--output-dir", "o", "--lr", "3e-5",
                                      "--no-remat", "--query-field", "q", "--negative-field", ""])
    rc = run_config(args)
    assert rc.train.learning_rate == 3e-5 and rc.train.remat is False
    assert rc.fields.query == "q" and rc.fields.negative is None
    args = build_parser().parse_args(["embed", "--input", "a.jsonl", "b.jsonl", "--output", "out", "--no-shrink",
                                      "--prompt-name", ""])
    o = options.build(EmbedOptions, args)
    assert o.inputs == ("a.jsonl", "b.jsonl") and o.shrink is False and o.prompt_name is None


def test_a_config_on_a_base_file_overrides_only_what_it_names(tmp_path):
    from embeddinggemma_jax.options import resolve_config

    (tmp_path / "base.json").write_text('{"_comment": "shared", "a": 1, "b": [1, 2]}')
    (tmp_path / "mid.json").write_text('{"base": "base.json", "b": [3]}')
    (tmp_path / "top.json").write_text('{"base": "mid.json", "c": true}')
    assert resolve_config(tmp_path / "top.json") == {"_comment": "shared", "a": 1, "b": [3], "c": True}
    (tmp_path / "loop.json").write_text('{"base": "loop.json"}')
    with pytest.raises(ValueError, match="its own base"):
        resolve_config(tmp_path / "loop.json")
    (tmp_path / "gone.json").write_text('{"base": "nowhere.json"}')
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        resolve_config(tmp_path / "gone.json")
