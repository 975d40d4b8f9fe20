"""Watching a run: TensorBoard event files that TensorBoard's own reader loads (every metrics.jsonl value
at its step), W&B in offline mode, and jax.profiler traces that the profiler's reader opens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest



def _write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            w = [words[j] for j in rng.choice(len(words), 3, replace=False)]
            f.write(json.dumps({"query": " ".join(w), "positive": f"doc {i}: " + " ".join(reversed(w))}) + "\n")
    return path


def _accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return acc


def test_tensorboard_writer_round_trip_and_resume_drops_the_killed_runs_later_steps(tmp_path):
    from embeddinggemma_jax.train.monitor import TensorBoardWriter

    w = TensorBoardWriter(tmp_path / "tb")
    for s in (1, 2, 3):
        w.scalars(s, {"loss": 10.0 + s, "eval/768/recall@10": s / 10})
        w.flush()
    w.close()
    acc = _accumulator(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 11.0), (2, 12.0), (3, 13.0)]
    np.testing.assert_allclose([e.value for e in acc.Scalars("eval/768/recall@10")], [0.1, 0.2, 0.3], rtol=1e-6)
    # Killed after step 3 with its last checkpoint at 2: the resumed run logs step 3 again, differently.
    w = TensorBoardWriter(tmp_path / "tb", resume_step=3)
    w.scalars(3, {"loss": 99.0})
    w.scalars(4, {"loss": 100.0})
    w.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    acc = _accumulator(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 11.0), (2, 12.0), (3, 99.0), (4, 100.0)]


def test_profile_window_is_checked():
    from embeddinggemma_jax.errors import InputError
    from embeddinggemma_jax.train.monitor import parse_window

    assert parse_window("3:5", "--profile-steps") == (3, 5)
    assert parse_window(None, "--profile-steps") is None
    for bad in ("3", "5:3", "0:2", "a:b"):
        with pytest.raises(InputError, match="--profile-steps"):
            parse_window(bad, "--profile-steps")


@pytest.mark.slow
def test_run_writes_tensorboard_wandb_offline_and_a_profile(tiny_folder, tmp_path, monkeypatch):
    import jax

    from embeddinggemma_jax.train import step as st
    from embeddinggemma_jax.train.run import Run, RunConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train = _write_pairs(tmp_path / "train.jsonl", 24, seed=1)
    evals = _write_pairs(tmp_path / "eval.jsonl", 8, seed=2)
    out = tmp_path / "run"
    tc = st.TrainConfig(matryoshka_dims=(40, 16), total_steps=3, dtype="float32", learning_rate=1e-3)
    rc = RunConfig(model=str(tiny_folder), train_file=str(train), output_dir=str(out), train=tc, batch_size=4,
                   max_length=64, pad_to_max_length=True, save_every=10, eval_file=str(evals), eval_every=2,
                   progress=False, export=False, wandb="egj-test", profile_steps="2:2")
    run = Run(rc)
    try:
        run.fit(say=lambda s: None)
    finally:
        run.close()

    # TensorBoard's own reader has every scalar of metrics.jsonl at its step.
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    acc = _accumulator(out / "tb")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr", "step_seconds", "pairs_per_second", "tokens_per_second"):
        got = acc.Scalars(key)
        assert [e.step for e in got] == [1, 2, 3], key
        np.testing.assert_allclose([e.value for e in got], [r[key] for r in steps], rtol=1e-6, err_msg=key)
    evals_logged = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals_logged] == [0, 2, 3]
    for d in ("40", "16"):
        for metric in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
            got = acc.Scalars(f"eval/{d}/{metric}")
            assert [e.step for e in got] == [0, 2, 3]
            np.testing.assert_allclose([e.value for e in got], [r["eval"][d][metric] for r in evals_logged],
                                       rtol=1e-6)

    # W&B offline: its run folder, with the run's data file, in the run folder.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))[0].stat().st_size > 0
    assert (out / "wandb-run-id").read_text().strip() in runs[0].name

    # The profile: one trace where TensorBoard's profile plugin looks, that the profiler's reader parses,
    # with the step and phase annotations of step 2.
    traces = list((out / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces
    data = jax.profiler.ProfileData.from_file(str(traces[0]))
    names = {e.name for p in data.planes for line in p.lines for e in line.events}
    assert {"train", "data", "train_step", "place_batch"} <= names, sorted(names)[:50]


@pytest.mark.slow
def test_embed_profile_rounds_writes_a_trace_and_the_same_embeddings(tiny_folder, tmp_path):
    import jax

    from embeddinggemma_jax.batch import shards
    from embeddinggemma_jax.batch.job import EmbedOptions, run_embed

    corpus = _write_pairs(tmp_path / "pairs.jsonl", 40)  # embedded: the "query" field
    outs = {}
    for name, extra in (("plain", {}), ("profiled", {"profile_rounds": "2:2"})):
        out = tmp_path / name
        run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(corpus)], output=str(out), text_field="query",
                               buckets=(64, 128), shrink=False, tokens_per_device=128, unit_size=16, progress=False,
                               **extra))
        outs[name] = shards.load_all(out)
    assert outs["plain"][0] == outs["profiled"][0]
    np.testing.assert_array_equal(outs["plain"][1], outs["profiled"][1])
    traces = list((tmp_path / "profiled" / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces
    data = jax.profiler.ProfileData.from_file(str(traces[0]))
    names = {e.name for p in data.planes for line in p.lines for e in line.events}
    assert "embed_round" in names, sorted(names)[:50]
    assert not (tmp_path / "plain" / "profile").exists()
