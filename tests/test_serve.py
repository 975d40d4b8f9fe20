"""``embeddinggemma-jax serve``: the real server in a subprocess on a loopback port, driven by the official
``openai`` client and httpx.

Reference values come from ``EmbeddingGemma.encode`` in this process with the same options. The server
runs each text in the one batch shape of its length bucket while ``encode`` picks shapes from the whole
call, and XLA:CPU's last bits depend on the shape, so vectors are compared with a bound (normalised:
max abs difference 1e-6 on the tiny model; cosine >= 0.99999 as the issue asks), while a text's answer
alone and under 32 concurrent clients must agree bit for bit. Ordering tests hold the worker with a
gate file (a step gate passed to ``cmd_serve``) and read queue depths from /metrics, so nothing depends on timing.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from embeddinggemma_jax.compile_cache import ENV as CACHE_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-5f0c2e9a-never-logged"
ATOL = 1e-6  # normalised vectors, tiny model, fp32 (measured <= 2.2e-7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A server whose worker takes no batch while the file ``gate`` exists: ``cmd_serve`` with a step gate (the
# test's hook, injected; the command line has no such flag).
GATED_SERVE = ("import pathlib, sys; from embeddinggemma_jax.cli import build_parser; "
               "from embeddinggemma_jax.serve.cli import cmd_serve; gate = pathlib.Path(sys.argv[1]); "
               "sys.exit(cmd_serve(build_parser('serve').parse_args(sys.argv[2:]), step_gate=gate.exists))")

class Server:
    """``embeddinggemma-jax serve`` in a subprocess; ``wait_ready`` polls GET /ready. ``gate``: a file; while it
    exists the worker takes no batch (``GATED_SERVE``)."""

    def __init__(self, folder, tmp: Path, *args: str, env_cache: Path | None = None, extra_env: dict | None = None,
                 gate: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   JAX_PLATFORMS="cpu")
        if env_cache is not None:
            env[CACHE_ENV] = str(env_cache)
        env.update(extra_env or {})
        self._log = open(self.log_path, "w")
        launch = [sys.executable, "-c", GATED_SERVE, str(gate)] if gate else [sys.executable, "-m",
                                                                              "embeddinggemma_jax.cli"]
        self.gate = gate
        self.proc = subprocess.Popen([*launch, "serve", "--model", str(folder), "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.http.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def metric(self, name: str, **labels) -> float:
        text = self.http.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
        m = re.search(pattern, text, re.M)
        assert m, f"{name}{{{want}}} not in /metrics"
        return float(m.group(1))

    def wait_metric(self, name: str, value: float, timeout: float = 60.0, **labels) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log.close()


@pytest.fixture(scope="session")
def serve_cache(tmp_path_factory):
    """One persistent compilation cache for every server and this process: each shape compiles once."""
    path = tmp_path_factory.mktemp("xla-cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="module")
def tiny(tiny_folder, serve_cache):
    from embeddinggemma_jax import EmbeddingGemma

    return EmbeddingGemma.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory, serve_cache):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "keys").write_text(f"# test keys\n{KEY}\nsk-second-key\n")
    s = Server(tiny_folder, tmp, "--api-key-file", str(tmp / "keys"), "--max-inputs", "64",
               "--max-body-mb", "0.25", "--served-model-name", "tiny-gemma", env_cache=serve_cache)
    s.wait_ready()
    yield s
    s.close()


@pytest.fixture(scope="module")
def gated(tiny_folder, tmp_path_factory, serve_cache):
    """A server whose worker takes no batch while ``gate`` exists, with a queue of 12 texts (the batch shapes
    are the other server's, so they come from the compilation cache)."""
    tmp = tmp_path_factory.mktemp("gated")
    s = Server(tiny_folder, tmp, "--max-inputs", "4", "--max-queue", "12", gate=tmp / "gate", env_cache=serve_cache)
    s.wait_ready()
    yield s
    s.gate.unlink(missing_ok=True)
    s.close()


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def ref(model, texts, **options):
    """``encode`` one text per batch: the same numbers as any batch size up to the last bits, and only one
    shape per length bucket to compile in this process."""
    return model.encode(texts, batch_size=1, **options)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_matches(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL * max(1.0, float(np.abs(want).max())))
    nz = np.linalg.norm(want, axis=-1) > 0
    assert (np.sum(unit(got[nz]) * unit(want[nz]), -1) >= 0.99999).all()


TEXTS = ["Which planet is known as the Red Planet?", "Mars is red.", "", "zz", "naïve café — 東京 🚀",
         "a somewhat longer sentence, so that it lands in another length bucket than the short ones " * 1]


def n_tokens(texts, prompt=""):
    """The tiny model's tokenizer is byte-level: UTF-8 bytes + <bos> + <eos>, at most 128."""
    return sum(min(128, len((prompt + t).encode()) + 2) for t in texts)


def test_worker_plans_one_shape_per_bucket(tiny):
    """The worker's planner: a batch of one bucket's texts always has that bucket's full row count, capped by
    --max-batch-tokens; the shapes it warms are exactly one per bucket."""
    from embeddinggemma_jax.batching import bucket_length
    from embeddinggemma_jax.serve.engine import BatchingWorker

    old = tiny.max_batch_tokens
    tiny.max_batch_tokens = 256
    try:
        w = BatchingWorker(tiny, batch_size=8, max_wait=0.0, max_queue=10)
        assert w.shapes() == [(min(8, 1 << (256 // L).bit_length() - 1), L) for L in tiny.length_buckets]
        for n in (1, 3, 8):
            for L in tiny.length_buckets:
                ids = [list(range(2, 2 + L - k)) for k in range(n) if L - k > 0 and bucket_length(L - k, tiny.length_buckets) == L]
                ids = ids[:w.rows(L)]
                (b,) = w.planner.batches(ids)
                assert b.ids.shape == (w.rows(L), L) and list(b.index) == list(range(len(ids)))
                assert not b.mask[len(ids):].any()
    finally:
        tiny.max_batch_tokens = old


# ----------------------------------------------------------------------------- the OpenAI route
@pytest.mark.slow
def test_openai_client_every_option_equals_encode(server, tiny):
    c = client(server)
    # The client asks for base64 by default and decodes it as little-endian float32.
    r = c.embeddings.create(model="tiny-gemma", input=TEXTS)
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert r.model == "tiny-gemma" and r.object == "list" and r.data[0].object == "embedding"
    assert r.usage.prompt_tokens == r.usage.total_tokens == n_tokens(TEXTS)
    assert_matches([d.embedding for d in r.data], ref(tiny, TEXTS))

    one = c.embeddings.create(model="tiny-gemma", input="Mars is red.", encoding_format="float")
    assert len(one.data) == 1
    assert_matches(one.data[0].embedding, ref(tiny, "Mars is red."))

    full = tiny.dimensions
    for dims in (32, full - 1, full, 1024, 8192):
        r = c.embeddings.create(model="tiny-gemma", input=TEXTS[:2], dimensions=dims, encoding_format="float")
        want = ref(tiny, TEXTS[:2], dimensions=dims)
        assert_matches([d.embedding for d in r.data], want)
        if dims > full:
            assert not np.asarray([d.embedding for d in r.data])[:, full:].any()  # zero padding

    r = c.embeddings.create(model="tiny-gemma", input=TEXTS[:3], dimensions=48, encoding_format="base64",
                            extra_body={"normalize": False})
    raw = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in r.data])
    assert_matches(raw, ref(tiny, TEXTS[:3], dimensions=48, normalize=False))
    assert abs(np.linalg.norm(raw[0]) - 1) > 1e-3  # really not normalised

    instruction = "task: classify the planet | query: "
    r = c.embeddings.create(model="tiny-gemma", input=TEXTS[:2], extra_body={"custom_instruction": instruction})
    assert_matches([d.embedding for d in r.data], ref(tiny, TEXTS[:2], prompt=instruction))
    assert r.usage.prompt_tokens == n_tokens(TEXTS[:2], instruction)
    r = c.embeddings.create(model="tiny-gemma", input=TEXTS[:2], extra_body={"custom_instruction": ""})
    assert_matches([d.embedding for d in r.data], ref(tiny, TEXTS[:2]))

    for name in sorted(tiny.prompts):
        r = c.embeddings.create(model="tiny-gemma", input=TEXTS[:2], extra_body={"prompt_name": name})
        assert_matches([d.embedding for d in r.data], ref(tiny, TEXTS[:2], prompt_name=name))
        assert r.usage.prompt_tokens == n_tokens(TEXTS[:2], tiny.prompts[name])

    long = "x" * 300  # 302 tokens: truncated to 128 with <eos> kept last, as the reference does
    r = c.embeddings.create(model="tiny-gemma", input=[long, "short"], extra_body={"truncate": True})
    assert_matches([d.embedding for d in r.data], ref(tiny, [long, "short"]))
    assert r.usage.prompt_tokens == 128 + 7
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="tiny-gemma", input=["short", long], extra_body={"truncate": False})
    assert e.value.body["param"] == "input" and "302 tokens" in e.value.body["message"]

    r = c.embeddings.create(model="tiny-gemma", input=TEXTS[:2], user="someone",
                            extra_body={"service_tier": "priority"})
    assert_matches([d.embedding for d in r.data], ref(tiny, TEXTS[:2]))
    for alias in (str(server.proc.args[server.proc.args.index("--model") + 1]),):
        assert c.embeddings.create(model=alias, input="a").model == "tiny-gemma"
    assert [m.id for m in c.models.list().data] == ["tiny-gemma"]


def test_tei_embed_route(server, tiny):
    h = {"Authorization": f"Bearer {KEY}"}
    r = server.http.post("/embed", json={"inputs": "Mars is red."}, headers=h)
    assert r.status_code == 200
    assert_matches(r.json(), ref(tiny, ["Mars is red."]))
    r = server.http.post("/embed", headers=h, json={"inputs": TEXTS[:3], "normalize": False, "truncate": True,
                                                    "prompt_name": "query", "dimensions": 40})
    assert_matches(r.json(), ref(tiny, TEXTS[:3], normalize=False, prompt_name="query", dimensions=40))
    r = server.http.post("/embed", headers=h, json={"inputs": "x" * 300, "truncate": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_health_ready_models_metrics_and_startup_log(server):
    assert server.http.get("/health").json() == {"status": "alive"}
    ready = server.http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["warm_seconds"] > 0
    server.http.post("/embed", json={"inputs": ["a", "b"]}, headers={"Authorization": f"Bearer {KEY}"})
    text = server.http.get("/metrics").text
    for name in ("embeddinggemma_requests_total", "embeddinggemma_request_duration_seconds_bucket",
                 "embeddinggemma_inputs_total", "embeddinggemma_tokens_total", "embeddinggemma_batches_total",
                 "embeddinggemma_padding_efficiency", "embeddinggemma_queue_depth"):
        assert name in text
    assert server.metric("embeddinggemma_requests_total", route="/embed", status="200") >= 1
    assert server.metric("embeddinggemma_queue_depth", tier="priority") == 0
    eff = server.metric("embeddinggemma_padding_efficiency")
    assert 0 < eff <= 1
    log = server.log()
    assert f"http://127.0.0.1:{server.port}" in log and "dtype float32" in log and "1 cpu device(s)" in log
    # --max-batch-tokens auto: 256 tokens a batch on CPU, powers of two below --batch-size 32
    assert "batch shapes (rows x length), one per length bucket: 16x16, 8x24, 8x32, 4x40, 4x48, 4x64, 2x80, 2x96, " \
           "2x112, 2x128" in log


# ----------------------------------------------------------------------------- errors
def post(server, body, key=KEY, route="/v1/embeddings", **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if "content" in kw:  # raw bytes: say they are JSON (the server refuses other media types with 415)
        headers["Content-Type"] = "application/json"
    if isinstance(body, (dict, list, str, int)) and "content" not in kw:
        kw["json"] = body
    return server.http.post(route, headers=headers, **kw)


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body,param,code", [
    ({"model": "tiny-gemma"}, "input", "missing_required_parameter"),
    ({"model": "tiny-gemma", "input": []}, "input", "empty_input"),
    ({"model": "tiny-gemma", "input": 5}, "input", "invalid_type"),
    ({"model": "tiny-gemma", "input": ["a", None]}, "input", "invalid_type"),
    ({"model": "tiny-gemma", "input": [1, 2, 3]}, "input", "token_ids_unsupported"),
    ({"model": "tiny-gemma", "input": [[1, 2], [3]]}, "input", "token_ids_unsupported"),
    ({"model": "tiny-gemma", "input": ["a"] * 65}, "input", "too_many_inputs"),
    ({"input": "a"}, "model", "missing_required_parameter"),
    ({"model": "tiny-gemma", "input": "a", "dimensions": 31}, "dimensions", "invalid_value"),
    ({"model": "tiny-gemma", "input": "a", "dimensions": 8193}, "dimensions", "invalid_value"),
    ({"model": "tiny-gemma", "input": "a", "dimensions": "256"}, "dimensions", "invalid_type"),
    ({"model": "tiny-gemma", "input": "a", "dimensions": 25.5}, "dimensions", "invalid_type"),
    ({"model": "tiny-gemma", "input": "a", "normalize": "yes"}, "normalize", "invalid_type"),
    ({"model": "tiny-gemma", "input": "a", "truncate": 1}, "truncate", "invalid_type"),
    ({"model": "tiny-gemma", "input": "a", "prompt_name": "nope"}, "prompt_name", "unknown_prompt_name"),
    ({"model": "tiny-gemma", "input": "a", "prompt_name": "query", "custom_instruction": "x: "},
     "custom_instruction", "invalid_value"),
    ({"model": "tiny-gemma", "input": "a", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"model": "tiny-gemma", "input": "a", "service_tier": "flex"}, "service_tier", "invalid_value"),
    ({"model": "tiny-gemma", "input": "a", "custom_instruction": 3}, "custom_instruction", "invalid_type"),
    ({"model": "tiny-gemma", "input": "a", "temperature": 1}, "temperature", "unknown_parameter"),
])
def test_400_names_the_field(server, body, param, code):
    err = error_of(post(server, body), 400)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")


def test_400_malformed_json_and_tei_fields(server):
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b"null"):
        assert error_of(post(server, None, content=raw), 400)["code"] == "invalid_json"
    lone = b'{"model": "tiny-gemma", "input": ["ok", "bad \\ud800"]}'  # a lone surrogate, valid JSON
    err = error_of(post(server, None, content=lone), 400)
    assert err["param"] == "input" and "'input[1]' is not valid UTF-8" in err["message"]
    assert error_of(post(server, {"inputs": []}, route="/embed"), 400)["param"] == "inputs"
    assert error_of(post(server, {"input": "a"}, route="/embed"), 400)["code"] == "unknown_parameter"


def test_401_404_413(server):
    for key in (None, "sk-wrong", KEY + "x", KEY[:-1]):
        err = error_of(post(server, {"model": "tiny-gemma", "input": "a"}, key=key), 401)
        assert err["code"] == "invalid_api_key"
    assert error_of(post(server, {"inputs": "a"}, key=None, route="/embed"), 401)["code"] == "invalid_api_key"
    assert post(server, {"model": "tiny-gemma", "input": "a"}, key="sk-second-key").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").embeddings.create(model="tiny-gemma", input="a")
    with pytest.raises(openai.NotFoundError) as e:
        client(server).embeddings.create(model="text-embedding-3-small", input="a")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert error_of(server.http.get("/v1/nothing"), 404)["code"] == "not_found"
    big = {"model": "tiny-gemma", "input": ["y" * 1000] * 300}  # > 0.25 MiB
    assert error_of(post(server, big), 413)["code"] == "request_too_large"
    assert KEY not in server.log() and "sk-wrong" not in server.log()


# ----------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_32_concurrent_clients_equal_encode_and_bitwise_stable(server, tiny):
    rng = np.random.default_rng(0)
    words = "mars venus red planet rings ocean light dust storm orbit moon".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 20)))) for _ in range(64)]
    options = [{}, {"prompt_name": "query"}, {"dimensions": 64, "normalize": False}]

    def body(i):
        return {"model": "tiny-gemma", "input": texts[2 * i:2 * i + 2], "encoding_format": "base64",
                **options[i % len(options)]}

    def call(i):
        r = post(server, body(i))
        assert r.status_code == 200, r.text
        return [d["embedding"] for d in r.json()["data"]]

    alone = [call(i) for i in range(32)]  # one request at a time: each batch holds only its own texts
    before = server.metric("embeddinggemma_batches_total")
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(call, range(32)))
    assert server.metric("embeddinggemma_batches_total") - before < 64  # the 64 texts shared batches
    assert together == alone  # the same bits, whatever shared the batches
    for k, opt in enumerate(options):
        idx = [i for i in range(32) if i % len(options) == k]
        got = np.stack([np.frombuffer(base64.b64decode(e), "<f4") for i in idx for e in together[i]])
        want = ref(tiny, [t for i in idx for t in texts[2 * i:2 * i + 2]], **opt)
        assert_matches(got, want)


# ----------------------------------------------------------------------------- priority, 429, SIGTERM
def background(server, bodies):
    """Send each body on its own thread; returns the threads and a list that fills with (i, response)."""
    results = []

    def send(i, b):
        results.append((i, server.http.post("/v1/embeddings", json={"model": "model", **b})))

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    return threads, results


def steps(results):
    return {i: int(r.headers["x-batch-step"]) for i, r in sorted(results)}


# Tiny model, byte tokenizer: a text of n bytes has n + 2 tokens; these land in distinct length buckets.
BUCKET_TEXT = {16: "p", 24: "p" * 20, 32: "p" * 28, 40: "p" * 36, 48: "p" * 44, 112: "d" * 100}


@pytest.mark.slow
def test_priority_overtakes_queued_default_requests(gated):
    gated.gate.touch()
    first = gated.metric("embeddinggemma_batches_total")
    threads, results = background(gated, [{"input": f"default {i}"} for i in range(5)])  # bucket 16
    gated.wait_metric("embeddinggemma_queue_depth", 5, tier="default")
    t2, r2 = background(gated, [{"input": [BUCKET_TEXT[24], "urgent"], "service_tier": "priority"}])
    gated.wait_metric("embeddinggemma_queue_depth", 2, tier="priority")
    gated.gate.unlink()
    for t in threads + t2:
        t.join()
    assert all(r.status_code == 200 for _, r in results + r2)
    s = {i: v - first for i, v in steps(results).items()}
    p = steps(r2)[0] - first
    # Batch 0: the priority text of bucket 24 leads, alone in its bucket. Batch 1: the other priority text
    # leads bucket 16 and the five earlier default texts fill its spare rows (16 rows a batch).
    assert p == 1 and set(s.values()) == {1}
    gated.gate.touch()
    first = gated.metric("embeddinggemma_batches_total")
    threads, results = background(gated, [{"input": BUCKET_TEXT[112]}])
    gated.wait_metric("embeddinggemma_queue_depth", 1, tier="default")  # arrival order fixed: 112 first
    t1, r1 = background(gated, [{"input": BUCKET_TEXT[40]}])
    gated.wait_metric("embeddinggemma_queue_depth", 2, tier="default")
    t2, r2 = background(gated, [{"input": BUCKET_TEXT[48], "service_tier": "priority"}])
    gated.wait_metric("embeddinggemma_queue_depth", 1, tier="priority")
    gated.gate.unlink()
    for t in threads + t1 + t2:
        t.join()
    assert steps(r2)[0] - first == 0  # the priority text first
    assert (steps(results)[0] - first, steps(r1)[0] - first) == (1, 2)  # then the defaults, oldest first


@pytest.mark.slow
def test_default_tier_is_not_starved(gated):
    """With priority texts always waiting, a default text still runs after STARVATION_STEPS batches."""
    from embeddinggemma_jax.serve.engine import STARVATION_STEPS

    gated.gate.touch()
    first = gated.metric("embeddinggemma_batches_total")
    td, rd = background(gated, [{"input": BUCKET_TEXT[112]}])
    gated.wait_metric("embeddinggemma_queue_depth", 1, tier="default")
    tp, rp = background(gated, [{"input": BUCKET_TEXT[L], "service_tier": "priority"} for L in (16, 24, 32, 40, 48)])
    gated.wait_metric("embeddinggemma_queue_depth", 5, tier="priority")
    gated.gate.unlink()
    for t in td + tp:
        t.join()
    d = steps(rd)[0] - first
    p = sorted(v - first for v in steps(rp).values())
    assert STARVATION_STEPS == 3 and d == 3 and p == [0, 1, 2, 4, 5]


@pytest.mark.slow
def test_full_queue_gives_429_with_retry_after(gated, tiny):
    gated.gate.touch()
    threads, results = background(gated, [{"input": [f"t{i}{j}" for j in range(4)]} for i in range(3)])
    gated.wait_metric("embeddinggemma_queue_depth", 12, tier="default")
    r = gated.http.post("/v1/embeddings", json={"model": "model", "input": "one more"})
    err = error_of(r, 429)
    assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    gated.gate.unlink()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for _, r in results)
    assert gated.metric("embeddinggemma_queue_rejections_total", tier="default") == 1


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits_0(gated, tiny):
    """Last on the gated server: it does not survive this test."""
    gated.gate.touch()
    bodies = [{"input": [f"in flight {i}", f"second {i}"]} for i in range(4)]
    threads, results = background(gated, bodies)
    gated.wait_metric("embeddinggemma_queue_depth", 8, tier="default")
    gated.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while gated.http.get("/ready").json()["status"] != "draining":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert gated.http.get("/ready").status_code == 503
    err = error_of(gated.http.post("/v1/embeddings", json={"model": "model", "input": "late"}), 503)
    assert err["code"] == "shutting_down"
    gated.gate.unlink()
    for t in threads:
        t.join()
    assert sorted(i for i, _ in results) == [0, 1, 2, 3]
    for i, r in results:
        assert r.status_code == 200
        assert_matches([d["embedding"] for d in r.json()["data"]], ref(tiny, bodies[i]["input"]))
    assert gated.proc.wait(60) == 0


@pytest.mark.slow
def test_two_devices_run_the_data_parallel_step(tiny_folder, tiny, tmp_path, serve_cache):
    s = Server(tiny_folder, tmp_path, "--warmup", "none", "--batch-size", "4", env_cache=serve_cache,
               extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    try:
        s.wait_ready()
        texts = ["one", "two", "three"]  # one bucket: a single shape to compile
        r = s.http.post("/embed", json={"inputs": texts})
        assert r.status_code == 200, r.text
        assert_matches(r.json(), ref(tiny, texts))
        assert "2 cpu device(s)" in s.log() and "4x16, 4x24" in s.log()
    finally:
        s.close()


def test_a_model_that_cannot_load_exits_non_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    s = Server(tmp_path / "empty", tmp_path, "--warmup", "none")
    try:
        assert s.proc.wait(120) == 1
        assert "could not start the model" in s.log()
    finally:
        s.close()


def test_bad_flags_are_one_line_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "embeddinggemma_jax.cli", "serve", *args], capture_output=True,
                              text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)

    r = run("--max-inputs", "10", "--max-queue", "5")
    assert r.returncode == 1 and "--max-queue 5 is below --max-inputs 10" in r.stderr
    (tmp_path / "keys").write_text("# nothing\n")
    r = run("--api-key-file", str(tmp_path / "keys"))
    assert r.returncode == 1 and "holds no API key" in r.stderr
    r = run("--max-batch-tokens", "lots")
    assert r.returncode == 2 and "--max-batch-tokens" in r.stderr


# ----------------------------------------------------------------------------- the real weights
@pytest.mark.real
@pytest.mark.slow
def test_real_model_card_similarities(real_folder, real_model, tmp_path, serve_cache):
    from embeddinggemma_jax.cli import DEMO_DOCUMENTS, DEMO_QUERY

    s = Server(real_folder, tmp_path, "--warmup", "none", "--served-model-name", "google/embeddinggemma-300m",
               env_cache=serve_cache)
    try:
        s.wait_ready()
        c = client(s, key="unused")
        q = c.embeddings.create(model="embeddinggemma-300m", input=DEMO_QUERY, encoding_format="float",
                                extra_body={"prompt_name": "query"}).data[0].embedding
        d = [e.embedding for e in c.embeddings.create(model="google/embeddinggemma-300m", input=DEMO_DOCUMENTS,
                                                      extra_body={"prompt_name": "document"}).data]
        sims = real_model.similarity(q, d)[0]
        want = real_model.similarity(real_model.encode_query(DEMO_QUERY), real_model.encode_document(DEMO_DOCUMENTS))[0]
        np.testing.assert_allclose(sims, want, atol=1e-4)
        np.testing.assert_allclose(sims, [0.3008, 0.6361, 0.4927, 0.4889], atol=1e-4)
        for dims in (256, 1024):
            r = c.embeddings.create(model="embeddinggemma-300m", input=DEMO_DOCUMENTS[:2], dimensions=dims)
            got, ref = np.asarray([e.embedding for e in r.data]), real_model.encode(DEMO_DOCUMENTS[:2], dimensions=dims)
            assert (np.sum(unit(got[:, :256]) * unit(ref[:, :256]), -1) >= 0.99999).all()
            np.testing.assert_allclose(got, ref, atol=1e-5)
    finally:
        s.close()
