"""Issue 26's server probes, measured: memory under a flood of huge requests, and the drain deadline.

The server runs a model folder with the REAL EmbeddingGemma tokenizer (tokenizer.json from the cached
``google/embeddinggemma-300m``, 262,144 tokens, 2,048 tokens per text) and tiny random weights of that
vocabulary, so the tokenizer's work and memory are the real ones while the device step stays cheap. It
listens on 127.0.0.1 only and uses the default limits (see docs/serving.md).

Floods, each three concurrent requests sent at once; the server's peak RSS is reset (``/proc/PID/clear_refs``)
before each and read back (``VmHWM``) after; a small request is sent every 0.5 s meanwhile and its slowest
answer kept:

- ``huge_words`` / ``huge_cjk``: issue 26's probe, 2,048 x ~15 KB texts per request (29-31 MB of JSON):
  English-like words, or rare CJK characters with no space (byte-fallback tokens, no cut point).
- ``at_limits_words`` / ``at_limits_cjk``: requests the defaults accept, each as large as
  ``--max-request-tokens`` allows (146 texts of ~15 KB, each truncated to 2,048 tokens): they are tokenised,
  queued and embedded.

Then the drain probe: a client sends half a body and stalls, SIGTERM; the seconds to exit and the status.

    python benchmarks/serve_limits_probe.py            # writes benchmarks/serve_limits_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXTS_PER_REQUEST = 2048
TEXT_BYTES = 15_000


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_folder(out: Path) -> Path:
    """Tiny random weights over the real vocabulary, with the real model's tokenizer files."""
    from embeddinggemma_jax import hub
    from embeddinggemma_jax.config import EncoderConfig, HeadConfig
    from embeddinggemma_jax.export import save_folder
    from embeddinggemma_jax.testing import random_state

    real, why = hub.cached("google/embeddinggemma-300m")
    if real is None:
        raise SystemExit(f"the real model's tokenizer is not cached ({why}); run: embeddinggemma-jax fetch")
    enc = EncoderConfig.tiny(vocab_size=262_144, max_position_embeddings=2048)
    head = HeadConfig.tiny(enc, max_seq_length=2048)
    return save_folder(out, random_state(enc, head), enc, head, real)


def rss_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def texts(kind: str, n: int, rng: np.random.Generator) -> list[str]:
    if kind == "words":
        words = np.array("the of and a to in is you that it he was for on are as with his they I at be this have "
                         "from or one had by word but not what all were we when your can said there use an each "
                         "which she do how their if will up other about out many then them these so".split())
        base = " ".join(rng.choice(words, TEXT_BYTES // 3))[:TEXT_BYTES]
    else:  # rare CJK ideographs (Extension A, 3 bytes each), no spaces: no cut point, byte-fallback tokens
        base = "".join(chr(c) for c in rng.integers(0x3400, 0x4DB5, TEXT_BYTES // 3))
    return [base[i % 97:] + base[:i % 97] for i in range(n)]  # all different, same length


def start(folder: Path, port: int, log: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "embeddinggemma_jax.cli", "serve", "--model", str(folder),
                             "--port", str(port), "--warmup", "none", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready")


def flood(url: str, pid: int, bodies: list[bytes]) -> dict:
    small = {"model": "model", "input": "a small request from another client"}
    httpx.post(url + "/v1/embeddings", json=small, timeout=600)  # its shape compiled before the flood
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    idle = rss_kb(pid, "VmRSS")
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    done = threading.Event()
    latencies, small_status = {"default": [], "priority": []}, []

    def other_client(tier):
        while not done.is_set():
            t = time.monotonic()
            r = httpx.post(url + "/v1/embeddings", json={**small, "service_tier": tier}, timeout=600)
            latencies[tier].append(time.monotonic() - t)
            small_status.append(r.status_code)
            time.sleep(0.5)

    def send(body):
        t = time.monotonic()
        r = httpx.post(url + "/v1/embeddings", content=body, headers={"Content-Type": "application/json"},
                       timeout=1800)
        err = r.json().get("error", {}) if r.status_code != 200 else {}
        return {"status": r.status_code, "seconds": round(time.monotonic() - t, 2), "code": err.get("code"),
                "message": err.get("message")}

    watchers = [threading.Thread(target=other_client, args=(tier,)) for tier in latencies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futs = [pool.submit(send, b) for b in bodies]
        time.sleep(0.2)
        for w in watchers:
            w.start()
        answers = [f.result() for f in futs]
    done.set()
    for w in watchers:
        w.join()
    peak = rss_kb(pid, "VmHWM")
    return {"request_mb": [round(len(b) / 1e6, 1) for b in bodies], "answers": answers,
            "idle_rss_mb": round(idle / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "peak_over_idle_mb": round((peak - idle) / 1024, 1), "rss_after_mb": round(rss_kb(pid, "VmRSS") / 1024, 1),
            "wall_s": round(time.monotonic() - t0, 2), "server_cpu_s": round(cpu_seconds(pid) - cpu0, 2),
            "small_requests": len(small_status), "small_all_200": all(s == 200 for s in small_status),
            **{f"small_{tier}_latency_{stat}_s": round(float(f(v)), 3) if v else None
               for tier, v in latencies.items() for stat, f in (("max", np.max), ("median", np.median))}}


def drain_probe(folder: Path, tmp: Path, drain_timeout: float) -> dict:
    port = free_port()
    log = tmp / "drain.log"
    proc = start(folder, port, log, "--drain-timeout-s", str(drain_timeout))
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\": \"model\", \"input\": \"")
            time.sleep(1.0)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(drain_timeout + 60)
            except subprocess.TimeoutExpired:
                status = None
            took = time.monotonic() - t0
        cut = [line.strip() for line in log.read_text().splitlines() if "did not end within" in line]
        return {"drain_timeout_s": drain_timeout, "exit_status": status, "seconds_to_exit": round(took, 2),
                "within_deadline": status == 3 and took <= drain_timeout, "log_line": cut[:1]}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(result: dict) -> str:
    """The Markdown table docs/serving.md shows, from the JSON this script wrote."""
    rows = ["| Flood (3 concurrent requests) | MB each | Answers | Peak RSS over idle (MiB) | Server CPU (s) | "
            "Small requests meanwhile: all 200 | slowest / median (s), default tier | slowest / median (s), "
            "priority tier |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["floods"].items():
        answers = ", ".join(f"{a['status']} {a['code'] or ''} in {a['seconds']} s".replace("  ", " ")
                            for a in r["answers"])
        rows.append(f"| `{name}` | {r['request_mb'][0]} | {answers} | {r['peak_over_idle_mb']} (idle "
                    f"{r['idle_rss_mb']}) | {r['server_cpu_s']} | {r['small_requests']}: {r['small_all_200']} | "
                    f"{r['small_default_latency_max_s']} / {r['small_default_latency_median_s']} | "
                    f"{r['small_priority_latency_max_s']} / {r['small_priority_latency_median_s']} |")
    d = result["drain"]
    return "\n".join(rows) + (f"\n\nDrain: SIGTERM with one client holding half a body, `--drain-timeout-s "
                              f"{d['drain_timeout_s']:g}`: exit status {d['exit_status']} after "
                              f"{d['seconds_to_exit']} s. CPU: {result['cpu']} ({result['cores']} cores).\n")


def blocks(json_path: Path = REPO / "benchmarks" / "serve_limits_probe.json") -> dict[str, dict[str, str]]:
    return {"serving.md": {"SERVE_PROBE": table(json.loads(json_path.read_text()))}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "serve_limits_probe.json"))
    p.add_argument("--drain-timeout-s", type=float, default=30.0, help="the server's default")
    p.add_argument("--table", action="store_true", help="only regenerate docs/serving.md's table from --out")
    args = p.parse_args()
    if args.table:
        from doc_tables import sync

        sync(blocks(Path(args.out)), check=False)
        return 0
    from embeddinggemma_jax.serve.config import ServeOptions

    defaults = ServeOptions()
    rng = np.random.default_rng(0)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "model": "tiny random weights, real EmbeddingGemma "
              "tokenizer (262,144 tokens, 2,048 per text)", "limits": {
                  k: getattr(defaults, k) for k in ("max_body_mb", "max_inputs", "max_input_chars", "max_request_chars",
                                                    "max_request_tokens", "max_tokens_in_flight",
                                                    "max_requests_in_flight", "max_response_mb", "max_connections",
                                                    "header_timeout_s", "body_timeout_s", "drain_timeout_s")},
              "bound_mb_over_idle": 2048, "floods": {}}
    per_request_fit = defaults.max_request_tokens // 2048  # texts of >= 2,048 tokens a request may hold
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        folder = make_folder(tmp / "model")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(folder, port, tmp / "server.log")
        try:
            wait_ready(url, proc)
            for kind in ("words", "cjk"):
                for name, n in ((f"huge_{kind}", TEXTS_PER_REQUEST), (f"at_limits_{kind}", per_request_fit)):
                    bodies = [json.dumps({"model": "model", "input": texts(kind, n, rng)}, ensure_ascii=False).encode()
                              for _ in range(3)]  # UTF-8 as clients send it (3 bytes per CJK character)
                    r = flood(url, proc.pid, bodies)
                    del bodies
                    r["within_bound"] = r["peak_over_idle_mb"] <= result["bound_mb_over_idle"] and r["small_all_200"]
                    result["floods"][name] = r
                    print(name, json.dumps(r), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        result["drain"] = drain_probe(folder, tmp, args.drain_timeout_s)
        print("drain", json.dumps(result["drain"]), flush=True)
    from embeddinggemma_jax.io_utils import atomic_write_json

    atomic_write_json(args.out, result)
    from doc_tables import sync

    sync(blocks(Path(args.out)), check=False)
    print(f"wrote {args.out} and the table in docs/serving.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
