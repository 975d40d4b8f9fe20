"""``embed``, ``verify`` and ``train`` against a local GCS emulator (the ``gcp-storage-emulator`` package, started
on a free 127.0.0.1 port for this module and stopped after), reached through ``STORAGE_EMULATOR_HOST`` alone, as
a user's job reaches a bucket (see embeddinggemma_jax/storage.py for what that variable turns on in-process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embeddinggemma_jax.batch.job import EmbedOptions, run_embed, verify
from test_batch_job import FAST, FAST_ARGS, cli, output_files, slow_step_cli, write_corpus

import gcp_storage_emulator  # noqa: F401  the test extra installs it (and gcsfs): never a silent skip

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator (in memory, bucket ``test``) on a free port; STORAGE_EMULATOR_HOST is its URL."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("emulator") / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
                             str(port), "--in-memory", "--default-bucket", BUCKET], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.1)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield url
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def env(emulator_url: str, cache: Path, devices: int = 1) -> dict:
    """What a user sets: STORAGE_EMULATOR_HOST; the rest is this test suite's (CPU devices, compile cache)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GCSFS_", "TENSORSTORE_", "GOOGLE_AUTH"))}
    return dict(e, STORAGE_EMULATOR_HOST=emulator_url, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def bucket_files(url: str) -> dict[str, bytes]:
    """Every object under gs://bucket/prefix, by name relative to it."""
    from embeddinggemma_jax.storage import epath

    base = url[len("gs://"):]
    out = {}
    for d, _, files in epath(url).walk():  # names without the gs:// prefix
        rel = str(d)[len(base):].strip("/")
        for f in files:
            out[f"{rel}/{f}" if rel else f] = epath(f"gs://{d}/{f}").read_bytes()
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla-cache")


@pytest.mark.slow
def test_embed_to_gs_killed_resumed_equals_local_and_verifies(tiny_folder, emulator, cache, tmp_path):
    """A job writing gs:// killed with SIGKILL after its first shard, rerun: the bucket holds byte for byte what a
    local run writes (a shard's metadata holds its input path, so both read the same input); verify passes on
    gs:// and names a tampered object; two processes reading the input from gs:// and writing one gs:// output
    give the same embeddings and ids, and verify passes."""
    corpus = write_corpus(tmp_path / "c.jsonl", n=64, seed=11, bad_lines=(9,))
    args = ["--model", tiny_folder, "--input", corpus, "--id-field", "id", "--on-bad-record", "skip", *FAST_ARGS]
    e = env(emulator, cache)
    local = tmp_path / "local"  # the reference, in this process (the options FAST_ARGS gives)
    run_embed(EmbedOptions(model=str(tiny_folder), inputs=[str(corpus)], output=str(local), id_field="id",
                           on_bad_record="skip", **FAST))
    expected = output_files(local)

    url = f"gs://{BUCKET}/emb"
    p = subprocess.Popen(slow_step_cli("embed", *args, "--output", url, delay=1.0), env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from embeddinggemma_jax.storage import epath

    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if epath(f"{url}/shards/00000-0000000.json").exists():
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()[-3000:]
    assert not epath(f"{url}/manifest.json").exists()
    t0 = time.perf_counter()
    r = subprocess.run(cli("embed", *args, "--output", url, "--json"), env=e, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["units_skipped"] >= 1 and summary["units_done"] + summary["units_skipped"] == 4
    assert time.perf_counter() - t0 < 120
    assert bucket_files(url) == expected

    assert verify(url, [str(corpus)])["records"] == 63
    epath(f"{url}/shards/00000-0000002.ids.jsonl").write_bytes(b'"doc-1"\n')
    v = subprocess.run(cli("verify", url), env=e, capture_output=True, text=True, timeout=120)
    assert v.returncode == 1 and "00000-0000002.ids.jsonl does not match its checksum" in v.stderr, v.stderr

    # two processes (gloo), one gs:// output, the input read from gs:// too
    two = f"gs://{BUCKET}/two"
    remote_corpus = f"gs://{BUCKET}/in/c.jsonl"
    epath(remote_corpus).write_bytes(corpus.read_bytes())
    args = [remote_corpus if a == corpus else a for a in args]
    port = _free_port()
    procs = [subprocess.Popen(cli("embed", *args, "--output", two, "--coordinator", f"127.0.0.1:{port}",
                                  "--num-processes", 2, "--process-id", i), env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [q.communicate(timeout=300) for q in procs]
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
    for q, (_, err) in zip(procs, outs):
        assert q.returncode == 0, err[-3000:]
    got = bucket_files(two)
    # Embeddings and ids byte for byte; the metadata names the gs:// input and counts padded tokens per round
    # (two hosts plan each round's units together).
    same = [k for k in expected if k.endswith((".npy", ".ids.jsonl"))]
    assert sorted(got) == sorted(expected) and len(same) == 2 * 4
    assert {k: got[k] for k in same} == {k: expected[k] for k in same}
    assert verify(two, [remote_corpus])["records"] == 63


def _train_args(tiny_folder, train, out, *extra):
    return ["train", "--model", str(tiny_folder), "--train-file", str(train), "--output-dir", str(out),
            "--steps", "4", "--dtype", "float32", "--lr", "1e-3", "--matryoshka-dims", "40,16", "--batch-size", "4",
            "--max-length", "64", "--pad-to-max-length", "--save-every", "2", "--warmup-steps", "1",
            "--no-progress", *map(str, extra)]


def _losses(text: str) -> list[tuple[int, float, float]]:
    recs = [json.loads(x) for x in text.splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


@pytest.mark.slow
def test_train_to_gs_killed_and_resumed_equals_the_local_run(tiny_folder, emulator, cache, tmp_path):
    """Issue 23 #3: ``train --output-dir gs://bucket/run`` (parquet pairs) on the emulator, kill -9 after its
    first checkpoint, rerun: every logged loss and gradient norm and every exported weight equal a local run's
    bit for bit; the checkpoints (Orbax, TensorStore), metrics.jsonl and final/ are objects in the bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embeddinggemma_jax.storage import epath

    recs = [{"query": f"query {i} " + "alpha beta gamma delta"[: 5 + i % 17],
             "positive": f"document {i} about " + "epsilon zeta eta theta"[: 4 + i % 13]} for i in range(24)]
    train = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({k: [r[k] for r in recs] for k in ("query", "positive")}), train)
    e = env(emulator, cache)
    local = tmp_path / "local"
    r = subprocess.run(cli(*_train_args(tiny_folder, train, local)), env=e, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _losses((local / "metrics.jsonl").read_text())
    assert [s for s, _, _ in ref] == [1, 2, 3, 4]

    url = f"gs://{BUCKET}/run"
    # Each step made 1 s slower (in the killed run only), so the kill lands before step 4.
    slow = ("import sys, time; from embeddinggemma_jax.train import step as st; mk = st.make_train_step; "
            "st.make_train_step = lambda *a, **k: (lambda f: lambda *x: (time.sleep(1.0), f(*x))[1])(mk(*a, **k)); "
            "from embeddinggemma_jax.cli import main; sys.exit(main())")
    p = subprocess.Popen([sys.executable, "-c", slow, *_train_args(tiny_folder, train, url)], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # Orbax commits a step on an object store with commit_success.txt (no rename); kill once step 2 has it
    while time.time() < deadline and p.poll() is None:
        if epath(f"{url}/checkpoints/2/commit_success.txt").exists():
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    killed = p.returncode == -signal.SIGKILL
    r = subprocess.run(cli(*_train_args(tiny_folder, train, url)), env=e, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    if killed:
        assert summary["resumed_from"] == 2, summary
    got = _losses(epath(f"{url}/metrics.jsonl").read_text())
    assert got == ref  # bit for bit: the same floats
    files = bucket_files(url)
    assert any(k.startswith("checkpoints/4/") for k in files)
    final_local = output_files(local / "final")
    assert {k[len("final/"):]: v for k, v in files.items() if k.startswith("final/")} == final_local
    assert killed, "the run finished before the kill: the resume path was not exercised"
