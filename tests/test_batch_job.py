"""The batch embedding job: readers, batch plans, shards, resume after SIGKILL, multi-device and
multi-process equality, verify, padding efficiency on a long-tailed corpus."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embeddinggemma_jax.batch import shards
from embeddinggemma_jax.bench import top_level_stdlib_docstrings
from embeddinggemma_jax.batch.job import EmbedOptions, JobError, VerifyError, run_embed, verify
from embeddinggemma_jax.batch.readers import BadRecordError, InputSpec, iter_units
from embeddinggemma_jax.errors import InputError
from embeddinggemma_jax.batching import BatchPlanner, allowed_rows, plan_efficiency

ROOT = Path(__file__).resolve().parents[1]
# Few batch shapes (compilation dominates the tiny model's run time): two buckets, no shrinking.
FAST = dict(buckets=(64, 128), shrink=False, tokens_per_device=128, unit_size=16, progress=False)
FAST_ARGS = ["--buckets", "64,128", "--no-shrink", "--tokens-per-device", "128", "--unit-size", "16", "--no-progress"]


def write_corpus(path: Path, n: int = 60, seed: int = 0, bad_lines: tuple[int, ...] = ()) -> Path:
    """jsonl with long-tailed text lengths, ids and some titles; bad_lines (1-based) are malformed."""
    r = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(1, n + 1):
            if i in bad_lines:
                f.write('{"id": "broken", "text": \n' if i % 2 else '{"id": 7}\n')
                continue
            k = min(20, int(r.paretovariate(1.3)))
            rec = {"id": f"doc-{i}", "text": " ".join(r.choice(words) for _ in range(k))}
            if i % 3 == 0:
                rec["title"] = f"title {i}"
            f.write(json.dumps(rec) + "\n")
    return path


def env_for(devices: int, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "embeddinggemma_jax.cli", *map(str, args)]


def slow_step_cli(*args, delay: float = 0.3) -> list[str]:
    """``cli(*args)`` with the job's device step made ``delay`` seconds slower per round."""
    code = ("import sys, time; from embeddinggemma_jax.batch import pipeline; "
            "from embeddinggemma_jax.batch.cli import cmd_embed; from embeddinggemma_jax.cli import build_parser; "
            f"slow = lambda *a: (time.sleep({delay}), pipeline.step(*a))[1]; "
            "sys.exit(cmd_embed(build_parser('embed').parse_args(sys.argv[1:]), pipeline.Stages(step=slow)))")
    return [sys.executable, "-c", code, *map(str, args)]


def output_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla-cache")


@pytest.fixture(scope="module")
def reference(tiny_folder, corpus, tmp_path_factory):
    """One uninterrupted, single-device run (in this process)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(corpus)], output=str(out), id_field="id",
                                     title_field="title", **FAST))
    return out, summary


# ------------------------------------------------------------------------------------------ readers
def test_units_are_fixed_line_ranges_and_bad_records_are_named(tmp_path):
    p = write_corpus(tmp_path / "c.jsonl", n=23, bad_lines=(5, 18))
    with open(p, "a") as f:
        f.write("\n")  # a blank line: counted, not a record
    spec = InputSpec((str(p),), "jsonl", id_field="id", unit_size=10)
    units = list(iter_units(spec))
    assert [(u.first_line, u.last_line) for u in units] == [(1, 10), (11, 20), (21, 24)]
    assert [len(u.records) for u in units] == [9, 9, 3]
    assert [b.line for u in units for b in u.bad] == [5, 18]
    assert "invalid JSON" in units[0].bad[0].error and "'text' is missing" in units[1].bad[0].error
    assert units[2].blank == 1
    # host selection: unselected units are skipped without parsing
    sel = list(iter_units(spec, lambda f, k: k == 1))
    assert [u.selected for u in sel] == [False, True, False] and sel[0].records == [] and len(sel[1].records) == 9


def test_text_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = tmp_path / "a.txt"
    t.write_bytes(b"first line\n\nthird\r\n\xff bad utf8\n")
    (u,) = iter_units(InputSpec((str(t),), "text"))
    assert [(r.id, r.text) for r in u.records] == [(f"{t}:1", "first line"), (f"{t}:3", "third")]
    assert u.blank == 1 and u.bad[0].line == 4 and "UTF-8" in u.bad[0].error

    q = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["x", None, "z", "w", "v"], "key": [1, 2, 3, 4, 5]}), q, row_group_size=2)
    units = list(iter_units(InputSpec((str(q),), "parquet", text_field="body", id_field="key", unit_size=3)))
    assert [[r.id for r in u.records] for u in units] == [[1, 3], [4, 5]]
    assert [(u.first_line, u.last_line) for u in units] == [(1, 3), (4, 5)]
    assert units[0].bad[0].line == 2
    with pytest.raises(ValueError, match="column"):
        list(iter_units(InputSpec((str(q),), "parquet", text_field="text")))


# ------------------------------------------------------------------------------------------ batch plans
def test_plan_batches_places_every_record_once_in_fixed_shapes():
    rng = np.random.default_rng(0)
    lengths = np.minimum(2048, (rng.pareto(1.2, 3000) * 20 + 5).astype(int)).tolist()
    buckets = (16, 32, 64, 128, 256, 512, 1024, 2048)
    rows_for = {L: max(8, 4096 // L // 8 * 8) for L in buckets}
    for shrink in (False, True):
        plan = BatchPlanner(buckets, rows_for, shrink="fine" if shrink else "none", row_multiple=8).plan(lengths)
        idx = np.concatenate([b.index for b in plan])
        assert sorted(idx.tolist()) == list(range(len(lengths)))
        for b in plan:
            assert b.rows in allowed_rows(rows_for[b.length], "fine", 8) and b.rows % 8 == 0
            assert max(lengths[i] for i in b.index) <= b.length and len(b.index) <= b.rows
            if not shrink:
                assert b.rows == rows_for[b.length]
        assert sum(len(b.index) < b.rows for b in plan) <= (len(buckets) if shrink else 1)
    planner = BatchPlanner((4,), 2, pad_id=0, shrink="none")
    batch = planner.pad([[5, 6, 7], [8]], planner.plan([3, 1])[0])
    assert batch.ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]] and batch.mask.sum() == 4


def test_padding_efficiency_on_stdlib_docstrings(real_folder):
    """Long-tailed lengths (median ~30 tokens, max ~1450) with the real tokenizer (no weights
    loaded), batched as the v5litepod-1 job does (its buckets and rows per chip)."""
    from embeddinggemma_jax import topologies
    from embeddinggemma_jax.tokenize import TextTokenizer

    docs = top_level_stdlib_docstrings()
    assert len(docs) > 2000
    tok = TextTokenizer(Path(real_folder) / "tokenizer.json", 2048)
    lengths = [len(t) for t in tok.encode(["title: none | text: " + d for d in docs])]
    assert max(lengths) > 20 * int(np.median(lengths))  # the long tail is there
    topo = topologies.get("v5litepod-1")
    plan = BatchPlanner(topo.buckets, topo.rows_per_chip, shrink="fine").plan(lengths)
    eff = plan_efficiency(lengths, plan)
    print(f"padding efficiency on {len(docs)} stdlib docstrings: {eff:.4f} ({len(plan)} batches)")
    assert eff >= 0.85


# ------------------------------------------------------------------------------------------ the job
def test_job_matches_encode_document_and_writes_a_verifiable_output(tiny_folder, corpus, reference):
    from embeddinggemma_jax import EmbeddingGemma

    out, summary = reference
    ids, emb = shards.load_all(out)
    recs = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert ids == [r["id"] for r in recs]
    model = EmbeddingGemma.from_pretrained(tiny_folder)
    want = model.encode_document([r["text"] for r in recs], titles=[r.get("title") for r in recs])
    assert np.abs(emb - want).max() <= 1e-6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["records"] == len(recs) and manifest["counts"]["shards"] == 4
    assert manifest["model"]["sha256"] and len(manifest["shards"]) == 4
    assert summary["compile_seconds"] > 0 and summary["compiled_shapes"] <= 2
    assert 0 < summary["padding_efficiency_this_run"] <= 1
    assert verify(str(out)) == {"records": len(recs), "bad_records": 0, "shards": 4, "duplicate_ids": []}


def test_verify_catches_missing_tampered_and_extra_shards(reference, tmp_path):
    import shutil

    src, _ = reference
    for damage, message in [
        (lambda d: (d / "shards/00000-0000001.json").unlink(), "no metadata"),
        (lambda d: (d / "shards/00000-0000002.ids.jsonl").write_text('"doc-1"\n'), "checksum"),
        (lambda d: shutil.copy(d / "shards/00000-0000000.npy", d / "shards/00000-0000009.npy"), "no input unit"),
        (lambda d: (d / "manifest.json").unlink(), "has not finished"),
    ]:
        d = tmp_path / f"copy{message[:4]}"
        shutil.copytree(src, d)
        damage(d)
        with pytest.raises(VerifyError, match=message):
            verify(str(d))


def test_bad_records_fail_with_file_and_line_or_go_to_errors(tiny_folder, tmp_path):
    from embeddinggemma_jax.cli import main

    p = write_corpus(tmp_path / "bad.jsonl", n=20, bad_lines=(7, 12))
    with pytest.raises(BadRecordError, match=rf"{p}:7: invalid JSON"):
        run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(p)], output=str(tmp_path / "o1"),
                               id_field="id", **FAST))
    assert main(["embed", "--model", str(tiny_folder), "--input", str(p), "--output", str(tmp_path / "o1"),
                 "--id-field", "id", *FAST_ARGS]) == 1

    out = tmp_path / "o2"
    run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(p)], output=str(out), id_field="id",
                           on_bad_record="skip", **FAST))
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["file"], e["line"]) for e in errors] == [(str(p), 7), (str(p), 12)]
    assert "'text' is missing" in errors[1]["error"]
    assert json.loads((out / "manifest.json").read_text())["counts"]["bad_records"] == 2
    assert verify(str(out), [str(p)])["records"] == 18
    # resuming into the same folder with other settings is refused, naming the setting
    with pytest.raises(JobError, match="dimensions"):
        run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(p)], output=str(out), id_field="id",
                               on_bad_record="skip", dimensions=32, **FAST))


def test_same_embeddings_on_8_device_meshes(tiny_folder, corpus, reference, cache, tmp_path):
    """(8,1), (4,2), (2,4) meshes of 8 CPU devices against the single-device run."""
    script = (
        "import sys, json\n"
        "from embeddinggemma_jax.batch.job import EmbedOptions, run_embed\n"
        "import jax; assert jax.device_count() == 8\n"
        "for shape in [(8, 1), (4, 2), (2, 4)]:\n"
        f"    run_embed(EmbedOptions(model={str(tiny_folder)!r}, inputs=[{str(corpus)!r}], id_field='id',"
        f" title_field='title', output={str(tmp_path)!r} + f'/m{{shape[0]}}x{{shape[1]}}', mesh=shape,"
        f" **{FAST!r}))\n")
    r = subprocess.run([sys.executable, "-c", script], env=env_for(8, cache), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_ids, ref = shards.load_all(reference[0])
    for shape in ["8x1", "4x2", "2x4"]:
        ids, emb = shards.load_all(tmp_path / f"m{shape}")
        assert ids == ref_ids
        assert np.abs(emb - ref).max() <= 1e-6, shape
        assert json.loads((tmp_path / f"m{shape}/manifest.json").read_text())["options"]["mesh"] == \
            [int(x) for x in shape.split("x")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_folder, corpus, reference, cache, tmp_path):
    """Two jax.distributed processes (gloo, 4 CPU devices each) write the same (id, embedding) set; with
    --json, process 0's stdout is the JSON summary alone (Gloo's "[Gloo] Rank 0 is connected..." goes to
    stderr: issue 26 #8)."""
    out = tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen(cli("embed", "--model", tiny_folder, "--input", corpus, "--output", out,
                                  "--id-field", "id", "--title-field", "title", *FAST_ARGS, "--json",
                                  "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i),
                              env=env_for(4, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    metas = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*[0-9].json"))]
    assert len(metas) == 4
    ref_ids, ref = shards.load_all(reference[0])
    ids, emb = shards.load_all(out)
    assert sorted(ids) == sorted(ref_ids) and len(set(ids)) == len(ids)
    got = dict(zip(ids, emb))
    assert max(np.abs(got[i] - e).max() for i, e in zip(ref_ids, ref)) <= 1e-6
    assert verify(str(out))["records"] == len(ref_ids)
    summary = json.loads(results[0][0])  # the whole of stdout
    assert summary["records"] == len(ref_ids) and summary["processes"] == 2
    assert results[1][0] == ""


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_identical(tiny_folder, cache, tmp_path):
    """kill -9 after k shards (k random in each third of the run, plus once before any shard),
    rerun the same command, compare every output byte with an uninterrupted run."""
    corpus = write_corpus(tmp_path / "c.jsonl", n=120, seed=3, bad_lines=(30, 77))
    args = ["--model", tiny_folder, "--input", corpus, "--id-field", "id", "--title-field", "title",
            "--on-bad-record", "skip", *FAST_ARGS]
    env = env_for(1, cache)
    ref = tmp_path / "ref"
    subprocess.run(cli("embed", *args, "--output", ref), env=env, check=True, capture_output=True, timeout=300)
    expected = output_files(ref)
    n_units = sum(1 for k in expected if k.endswith(".npy"))
    assert n_units == 8
    rng = random.Random(1234)
    kill_points = [0, rng.randint(1, 3), rng.randint(3, 5), rng.randint(6, 7)]
    for k in kill_points:
        out = tmp_path / f"kill{k}"
        # Each round's step made 0.3 s slower (in the killed run only), so the run cannot finish within
        # the up-to-50 ms between seeing the k-th shard and the kill: the kill always lands mid-run.
        p = subprocess.Popen(slow_step_cli("embed", *args, "--output", out), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            done = len(list((out / "shards").glob("*[0-9].json"))) if (out / "shards").exists() else 0
            if done >= k and (k > 0 or (out / "job.json").exists()):
                time.sleep(rng.uniform(0, 0.05))
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL, f"the run ended before the kill point {k}"
        assert not (out / "manifest.json").exists()
        r = subprocess.run(cli("embed", *args, "--output", out, "--json"), env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout)
        assert summary["units_skipped"] >= k and summary["units_done"] + summary["units_skipped"] == n_units
        assert output_files(out) == expected, f"kill after {k} shards"
        v = subprocess.run(cli("verify", out, "--input", corpus), env=env, capture_output=True, text=True)
        assert v.returncode == 0 and "118 records" in v.stdout, v.stderr


def test_a_run_killed_while_writing_the_manifest_resumes_to_the_same_files(tiny_folder, cache, tmp_path):
    """A kill during the last step leaves a temporary manifest (never renamed into place) next to the
    finished shards; the rerun removes it and writes the same files as an uninterrupted run."""
    corpus = write_corpus(tmp_path / "c.jsonl", n=40, seed=5)
    args = ["--model", tiny_folder, "--input", corpus, "--id-field", "id", *FAST_ARGS]
    env = env_for(1, cache)
    out = tmp_path / "out"
    subprocess.run(cli("embed", *args, "--output", out), env=env, check=True, capture_output=True, timeout=300)
    expected = output_files(out)
    (out / "manifest.json").unlink()
    (out / ".tmp-manifest.json-12345-abcdefgh").write_text('{"half written')
    subprocess.run(cli("embed", *args, "--output", out), env=env, check=True, capture_output=True, timeout=300)
    assert output_files(out) == expected


@pytest.mark.real
def test_real_weights_small_job_matches_sentence_transformers(real_folder, st_model, tmp_path):
    texts = ["Mars is known as the Red Planet.", "The mitochondria is the powerhouse of the cell.",
             "def add(a, b): return a + b", "Paris est la capitale de la France.", "short"]
    p = tmp_path / "in.txt"
    p.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out"
    summary = run_embed(EmbedOptions(model=str(real_folder), inputs=[str(p)], output=str(out), dtype="float32",
                                     buckets=(16, 32), shrink=False, progress=False))
    ids, emb = shards.load_all(out)
    assert ids == [f"{p}:{i}" for i in range(1, 6)] and summary["records"] == 5
    ref = st_model.encode(texts, prompt_name="document", convert_to_numpy=True)
    cos = (emb * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999, cos
    assert verify(str(out))["records"] == 5


def test_job_stages_run_on_their_own(tiny_folder, corpus, reference, tmp_path):
    """setup -> prepare -> step -> write -> finalize, called one by one, rebuild the reference output."""
    from embeddinggemma_jax.batch import job

    out = tmp_path / "staged"
    ctx = job.setup(EmbedOptions(model=str(tiny_folder), inputs=[str(corpus)], output=str(out), id_field="id",
                                 title_field="title", **FAST))
    stats, names = job.JobStats(), []
    for u in job.my_units(ctx, names):
        rnd = job.plan_round(ctx, u, True, job.tokenize_unit(ctx, u))
        assert sorted(np.concatenate([b.index for b in rnd.plan]).tolist()) == list(range(len(u.records)))
        assert all(job.host_share(b, 0, 1).tolist() == b.index.tolist() for b in rnd.plan)  # one host: all rows
        raw = job.step(ctx, rnd, stats)
        assert raw.shape == (len(u.records), ctx.model.dimensions)
        job.write(ctx, rnd, raw, stats)
        assert shards.check_shard(ctx.out, u.name) is None  # the shard is done now
    summary = job.finalize(ctx, stats, names, 1.0)
    assert summary["records"] == stats.records == 60 and summary["units_done"] == 4
    assert output_files(out) == output_files(reference[0])


# ------------------------------------------------------------------------------------------ refusals
def test_output_folder_that_is_not_a_job_folder_is_refused_before_writing(tiny_folder, corpus, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "manifest.json").write_text("{}")
    before = output_files(out)
    with pytest.raises(JobError, match="not an embed job folder; refusing"):
        run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(corpus)], output=str(out), id_field="id", **FAST))
    assert output_files(out) == before and sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "sub"]


def test_the_same_input_file_twice_is_refused(tiny_folder, corpus, tmp_path):
    link = tmp_path / "link.jsonl"
    link.symlink_to(corpus)
    for again in (str(corpus.parent / "." / corpus.name), str(link)):
        with pytest.raises(InputError, match="name the same file"):
            run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(corpus), again], output=str(tmp_path / "o"),
                                   **FAST))
    assert not (tmp_path / "o").exists()


def test_duplicate_ids_are_kept_and_reported_with_both_lines(tiny_folder, tmp_path, capsys):
    from embeddinggemma_jax.cli import main

    p = write_corpus(tmp_path / "dup.jsonl", n=30)
    lines = p.read_text().splitlines()
    rec = json.loads(lines[24])
    rec["id"] = "doc-3"  # line 25 repeats line 3's id, in another unit
    lines[24] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(p)], output=str(out), id_field="id", **FAST))
    want = [{"id": "doc-3", "first": {"file": str(p), "line": 3}, "again": {"file": str(p), "line": 25}}]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["duplicate_ids"] == want and manifest["counts"]["duplicate_ids"] == 1
    assert manifest["counts"]["records"] == 30  # both kept
    assert verify(str(out))["duplicate_ids"] == want
    assert main(["verify", str(out)]) == 0
    assert f"duplicate id \"doc-3\": {p}:3 and {p}:25" in capsys.readouterr().out
    # a manifest that hides them does not verify
    manifest["duplicate_ids"] = []
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="1 records with a repeated id, the manifest lists 0"):
        verify(str(out))


def test_bad_record_on_one_host_stops_both_with_its_message(tiny_folder, cache, tmp_path):
    """Line 20 is in unit 1, which process 1 owns; with --on-bad-record fail both processes exit 1
    with the same message instead of process 0 waiting in the next collective."""
    p = write_corpus(tmp_path / "bad.jsonl", n=40, bad_lines=(20,))
    port = _free_port()
    procs = [subprocess.Popen(cli("embed", "--model", tiny_folder, "--input", p, "--output", tmp_path / "out",
                                  "--id-field", "id", *FAST_ARGS,
                                  "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i),
                              env=env_for(1, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        results = [q.communicate(timeout=150) for q in procs]
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
    msgs = [err.strip().splitlines()[-1] for _, err in results]
    assert [q.returncode for q in procs] == [1, 1], msgs
    assert msgs[0] == msgs[1] and f"{p}:20:" in msgs[0] and "--on-bad-record skip" in msgs[0]


# ------------------------------------------------------------------------------------------ multi-host plans
def test_simulated_hosts_keep_one_hosts_padding_efficiency():
    """The job's round planner for 4 and 16 hosts (v5litepod-16, -64) on a generated long-tailed corpus
    (log-normal lengths, median ~35 tokens, p99 ~300) against one v5litepod-8 host: within 5 points."""
    from embeddinggemma_jax.batch.plan import job_planner, simulate

    rng = np.random.default_rng(0)
    n, unit = 200_000, 8192
    lens = np.clip(np.exp(rng.normal(np.log(30), 1.0, n)).astype(int) + 6, 8, 2048).tolist()
    units = [(k, lens[k * unit:(k + 1) * unit]) for k in range((n + unit - 1) // unit)]
    effs = {}
    for topo, hosts in [("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-64", 16)]:
        r = simulate(units, hosts, job_planner(topo, None, None, True, 2048, 0, hosts))
        assert r["records"] == n and r["tokens"] == sum(lens)  # every record planned exactly once
        effs[hosts] = r["padding_efficiency"]
    print("padding efficiency by hosts:", effs)
    assert effs[4] >= effs[1] - 0.05 and effs[16] >= effs[1] - 0.05


def test_plan_only_predicts_the_run_without_weights(tiny_folder, corpus, reference, tmp_path, capsys):
    from embeddinggemma_jax.cli import main

    folder = tmp_path / "no-weights"
    import shutil

    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").unlink()  # --plan-only reads configs and the tokenizer only
    assert main(["embed", "--plan-only", "--json", "--model", str(folder), "--input", str(corpus), "--id-field", "id",
                 "--title-field", "title", *FAST_ARGS]) == 0
    r = json.loads(capsys.readouterr().out)
    counts = reference[1]["manifest_counts"]
    assert (r["records"], r["tokens"], r["padded_tokens"]) == (counts["records"], counts["tokens"],
                                                               counts["padded_tokens"])
    assert r["batches"] == reference[1]["batches"] and r["compiled_shapes"] == reference[1]["compiled_shapes"]
    assert main(["embed", "--plan-only", "--model", str(folder), "--input", str(corpus), "--id-field", "id",
                 "--title-field", "title", *FAST_ARGS, "--simulate-hosts", "2"]) == 0
    assert "as 2 host(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_sigkill_then_rerun_is_identical(tiny_folder, cache, tmp_path):
    """Two processes killed with SIGKILL after some shards, rerun: every byte equals an uninterrupted
    two-process run."""
    corpus = write_corpus(tmp_path / "c.jsonl", n=120, seed=5)

    def start(out, command=cli):
        port = _free_port()
        return [subprocess.Popen(command("embed", "--model", tiny_folder, "--input", corpus, "--output", out,
                                     "--id-field", "id", *FAST_ARGS, "--coordinator", f"127.0.0.1:{port}",
                                     "--num-processes", 2, "--process-id", i),
                                 env=env_for(1, cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for i in range(2)]

    def finish(procs):
        errs = [q.communicate(timeout=300)[1] for q in procs]
        assert [q.returncode for q in procs] == [0, 0], errs[0][-2000:]

    finish(start(tmp_path / "ref"))
    expected = output_files(tmp_path / "ref")
    out = tmp_path / "killed"
    procs = start(out, slow_step_cli)  # slower rounds: the kill lands mid-run however fast the machine
    deadline = time.time() + 240
    while time.time() < deadline and all(q.poll() is None for q in procs):
        if (out / "shards").exists() and len(list((out / "shards").glob("*[0-9].json"))) >= 3:
            break
        time.sleep(0.002)
    for q in procs:
        q.send_signal(signal.SIGKILL)
        q.wait(timeout=60)
    assert [q.returncode for q in procs] == [-signal.SIGKILL] * 2, "the run ended before the kill point"
    assert not (out / "manifest.json").exists()
    finish(start(out))
    assert output_files(out) == expected


def test_host_work_overlaps_the_device_step(tiny_folder, tmp_path):
    """Tokenising (the reader thread) and the device step each made 0.5 s slower per unit: the run
    grows by about max(host, device) = 8 x 0.5 s, not by their sum (8 s)."""
    from embeddinggemma_jax.batch import job

    corpus = write_corpus(tmp_path / "c.jsonl", n=128, seed=2)  # 8 units of 16

    def run(name, stages=job.Stages()):
        return run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(corpus)], output=str(tmp_path / name),
                                      id_field="id", **FAST), stages)

    base = run("base")
    slow = run("slow", job.Stages(tokenize=lambda ctx, u: (time.sleep(0.5), job.tokenize_unit(ctx, u))[1],
                                  step=lambda ctx, rnd, stats: (time.sleep(0.5), job.step(ctx, rnd, stats))[1]))
    extra = slow["wall_seconds"] - base["wall_seconds"]
    print(f"wall {base['wall_seconds']:.2f} s -> {slow['wall_seconds']:.2f} s with 4 s host + 4 s device added")
    assert slow["wall_seconds"] >= 4.0 and extra <= 6.0, extra  # serial would add 8 s
    assert output_files(tmp_path / "slow") == output_files(tmp_path / "base")


# ------------------------------------------------------------------------------------------ changed inputs, odd inputs
def _rewrite_texts(p: Path, prefix: str) -> None:
    """Same path, lines and ids; other texts."""
    recs = [json.loads(x) for x in p.read_text().splitlines()]
    p.write_text("".join(json.dumps(dict(r, text=f"{prefix} {r['text']}")) + "\n" for r in recs))


def test_rerun_over_a_changed_input_redoes_its_shards_and_verify_fails_on_the_mix(tiny_folder, tmp_path, capfd):
    """Issue 26 #3: a job "killed" after 2 of 3 shards (the third shard and the manifest removed), the input
    rewritten with new texts under the same path, lines and ids, the same command rerun: the two kept shards
    are redone (never kept with the old texts' embeddings), so the output equals a fresh run on the new input
    byte for byte; verify --input on a finished output whose input was then rewritten fails naming the lines."""
    p = write_corpus(tmp_path / "c.jsonl", n=40, seed=7)
    opts = dict(model=str(tiny_folder), inputs=[str(p)], id_field="id", **FAST)
    out = tmp_path / "out"
    run_embed(EmbedOptions(output=str(out), **opts))
    assert verify(str(out), [str(p)])["records"] == 40
    _rewrite_texts(p, "changed")
    with pytest.raises(VerifyError, match=rf"shard 00000-0000000: {p} lines 1-16 changed since the shard was written"):
        verify(str(out), [str(p)])

    (out / "manifest.json").unlink()  # as if killed after two shards
    for f in (out / "shards").glob("00000-0000002.*"):
        f.unlink()
    s = run_embed(EmbedOptions(output=str(out), **opts))
    assert s["units_done"] == 3 and s["units_skipped"] == 0
    assert "lines 1-16 changed since shard 00000-0000000 was written" in capfd.readouterr().err
    fresh = tmp_path / "fresh"
    run_embed(EmbedOptions(output=str(fresh), **opts))
    assert output_files(out) == output_files(fresh)
    assert verify(str(out), [str(p)])["records"] == 40


def test_lone_surrogate_fails_with_file_and_line_or_is_skipped(tiny_folder, tmp_path):
    """Issue 26 #6: a JSON escape that decodes to a lone surrogate is a bad record (file:line), in the text,
    the title or the id; --on-bad-record skip counts it in errors.jsonl."""
    p = tmp_path / "s.jsonl"
    good = [json.dumps({"id": f"d{i}", "text": f"text {i}"}) for i in range(6)]
    p.write_text("\n".join(good[:2] + ['{"id": "x", "text": "a\\ud800b"}', good[2],
                                       '{"id": "y\\udfff", "text": "ok"}'] + good[3:]) + "\n")
    with pytest.raises(BadRecordError, match=rf"{p}:3: field 'text' holds a lone surrogate"):
        run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(p)], output=str(tmp_path / "o1"), id_field="id",
                               **FAST))
    out = tmp_path / "o2"
    s = run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(p)], output=str(out), id_field="id",
                               on_bad_record="skip", **FAST))
    assert s["records"] == 6 and s["bad"] == 2
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 5] and "id field 'id' holds a lone surrogate" in errors[1]["error"]


def test_bom_gzip_and_ids_that_differ_only_in_type(tiny_folder, tmp_path):
    """Issue 26 #9: a UTF-8 BOM is not part of the first record's text; a .jsonl.gz input is read (the
    same embeddings as the plain file); ids "1" and 1 are reported as duplicates."""
    import gzip

    t = tmp_path / "a.txt"
    t.write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    (u,) = iter_units(InputSpec((str(t),), "text"))
    assert [r.text for r in u.records] == ["first", "second"]
    j = tmp_path / "b.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "one"}\n{"id": "1", "text": "uno"}\n{"id": 2, "text": "two"}\n')
    z = tmp_path / "b.jsonl.gz"
    z.write_bytes(gzip.compress(j.read_bytes()))
    outs = {}
    for p in (j, z):
        outs[p.name] = out = tmp_path / f"out-{p.name}"
        run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(p)], output=str(out), id_field="id", **FAST))
        m = json.loads((out / "manifest.json").read_text())
        assert m["counts"]["records"] == 3 and m["counts"]["bad_records"] == 0
        assert m["duplicate_ids"] == [{"id": "1", "first": {"file": str(p), "line": 1},
                                       "again": {"file": str(p), "line": 2}}]
        assert verify(str(out), [str(p)])["records"] == 3
    np.testing.assert_array_equal(shards.load_all(outs[j.name])[1], shards.load_all(outs[z.name])[1])
    bad = tmp_path / "c.jsonl.gz"
    bad.write_bytes(b"not gzip\n")
    with pytest.raises(InputError, match=rf"input {bad}: not a readable gzip file"):
        list(iter_units(InputSpec((str(bad),), "jsonl")))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[:len(t) // 2], "is not valid JSON"),
    (lambda t: "[1, 2]", "holds a JSON list, not an object"),
    (lambda t: json.dumps(dict(json.loads(t), options=None)), "lacks or mangles options"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "counts"}), "lacks or mangles counts"),
    (lambda t: json.dumps(dict(json.loads(t), shards=[1])), "lacks or mangles shards"),
])
def test_verify_on_a_truncated_or_malformed_manifest_is_one_line(reference, tmp_path, damage, message):
    import shutil


    d = tmp_path / "copy"
    shutil.copytree(reference[0], d)
    (d / "manifest.json").write_text(damage((d / "manifest.json").read_text()))
    with pytest.raises(VerifyError, match=message):
        verify(str(d))
    r = subprocess.run(cli("verify", d), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_disk_full_names_the_path(tmp_path, monkeypatch):
    import errno

    from embeddinggemma_jax import io_utils

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_utils.os, "fsync", full)
    target = tmp_path / "shards" / "x.npy"
    with pytest.raises(OSError, match=rf"No space left on device while writing {target}"):
        shards.write_atomic(target, b"data")
    assert list((tmp_path / "shards").iterdir()) == []


def test_tpu_compile_refuses_empty_buckets():
    r = subprocess.run(cli("tpu-compile", "--topology", "v5litepod-1", "--buckets", ""), capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 2 and "expected positive comma-separated lengths" in r.stderr, r.stderr
