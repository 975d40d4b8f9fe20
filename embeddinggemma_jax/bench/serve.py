"""``embeddinggemma-jax serve-bench``: the server under a bounded load on the loopback interface, against
offline ``encode`` of the same texts in the same run.

1. Offline: ``bench``'s JAX worker embeds the corpus in a fresh process (warm-up pass, then timed passes).
2. The server starts in a subprocess with the same CPUs; ``/ready`` reports its warm-up time.
3. Idle: one request at a time, one text each: latency p50/p99.
4. Load: N concurrent clients (closed loop: each sends its next request when the last one is answered),
   each request one text, every text once: tokens/s against offline, latency p50/p99.
5. Mixed: the same with a quarter of the clients on the priority tier: p50/p99 per tier.
Tokens are real tokens (``<bos>``/``<eos>`` included, padding not), counted the same way on both sides.
The clients run in this process, on the same CPUs as the server: their cost is part of what is measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


async def _drive(url: str, model: str, texts: list[str], clients: int, priority_clients: int = 0) -> dict:
    """Closed-loop load: ``clients`` coroutines take the next text until every text has been sent once."""
    import httpx

    todo = iter(range(len(texts)))
    lat = {"default": [], "priority": []}
    tokens = [0]

    async def client(k: int, http) -> None:
        tier = "priority" if k < priority_clients else "default"
        for i in todo:
            t = time.perf_counter()
            r = await http.post("/v1/embeddings", json={"model": model, "input": texts[i], "encoding_format": "base64",
                                                        "service_tier": tier})
            if r.status_code != 200:
                raise RuntimeError(f"the server answered {r.status_code}: {r.text[:300]}")
            lat[tier].append(time.perf_counter() - t)
            tokens[0] += r.json()["usage"]["prompt_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        seconds = time.perf_counter() - t0
    out = {"clients": clients, "priority_clients": priority_clients, "requests": len(texts),
           "tokens": tokens[0], "seconds": seconds, "tokens_per_s": tokens[0] / seconds}
    for tier, v in lat.items():
        if v:
            out[tier] = {"p50_ms": 1e3 * _pct(v, 50), "p99_ms": 1e3 * _pct(v, 99), "n": len(v)}
    return out


def _metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def run(model: str, docstrings: int = 64, clients: int = 32, idle_requests: int = 32, threads: int | None = None,
        batch_size: int = 32, repeats: int = 2, server_args: tuple[str, ...] = (), timeout: float = 3600) -> dict:
    import httpx

    from embeddinggemma_jax.bench import speed
    from embeddinggemma_jax.bench.corpora import stdlib_docstrings
    from embeddinggemma_jax.source import read_source

    threads = threads or len(os.sched_getaffinity(0))
    src = read_source(model)
    folder, head, tok = src.folder, src.head_config, src.tokenizer()
    max_doc = min(700, head.max_seq_length)
    texts = stdlib_docstrings(tok, docstrings, min_tokens=min(50, max_doc // 2), max_tokens=max_doc)
    report = {"model": str(folder), "threads": threads, "texts": len(texts), "tokens": sum(tok.count(texts)),
              "clients": clients, "server_args": list(server_args), "cpu": _cpu_name()}

    with tempfile.TemporaryDirectory(prefix="eg-serve-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpora.json").write_text(json.dumps({"docstrings": texts}))
        off = speed._run_engine("jax-float32", folder, tmp, threads, batch_size, batch_size, repeats, "auto", timeout)
        c = off["corpora"]["docstrings"]
        report["offline"] = {"tokens_per_s": c["tokens_per_s"], "seconds": c["seconds"],
                             "padding_efficiency": c["padding_efficiency"]}

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        log = open(tmp / "server.log", "w")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        proc = subprocess.Popen([sys.executable, "-m", "embeddinggemma_jax.cli", "serve", "--model", str(folder),
                                 "--port", str(port), "--batch-size", str(batch_size), "--log-level", "warning",
                                 "--served-model-name", "bench", *server_args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        try:
            http = httpx.Client(base_url=url, timeout=600)
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}: "
                                       f"{(tmp / 'server.log').read_text()[-500:]}")
                try:
                    r = http.get("/ready")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError("the server was not ready in time")
                time.sleep(0.2)
            report["server_ready_s"] = time.perf_counter() - t0
            report["server_warm_s"] = r.json().get("warm_seconds")
            asyncio.run(_drive(url, "bench", texts[:clients], clients))  # first touch of each code path
            idle = asyncio.run(_drive(url, "bench", texts[:idle_requests], 1))
            report["idle"] = idle
            b0, p0 = _metric(http, "embeddinggemma_batch_real_tokens_total"), _metric(http, "embeddinggemma_batch_padded_tokens_total")
            report["load"] = asyncio.run(_drive(url, "bench", texts, clients))
            b1, p1 = _metric(http, "embeddinggemma_batch_real_tokens_total"), _metric(http, "embeddinggemma_batch_padded_tokens_total")
            report["load"]["padding_efficiency"] = (b1 - b0) / max(1.0, p1 - p0)
            report["load"]["ratio_to_offline"] = report["load"]["tokens_per_s"] / report["offline"]["tokens_per_s"]
            report["mixed"] = asyncio.run(_drive(url, "bench", texts, clients, priority_clients=max(1, clients // 4)))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                report["server_exit"] = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                report["server_exit"] = proc.wait()
            log.close()
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_report(r: dict) -> str:
    off, load, mixed, idle = r["offline"], r["load"], r["mixed"], r["idle"]
    lines = [f"{r['texts']} stdlib docstrings, {r['tokens']} tokens; {r['threads']} threads on {r['cpu']}; "
             f"server args: {' '.join(r['server_args']) or '(defaults)'}",
             f"offline encode: {off['tokens_per_s']:.0f} tok/s (padding efficiency {off['padding_efficiency']:.3f})",
             f"server ready after {r['server_ready_s']:.1f} s (warm-up {r['server_warm_s']} s)",
             f"idle, 1 client: p50 {idle['default']['p50_ms']:.0f} ms, p99 {idle['default']['p99_ms']:.0f} ms",
             f"load, {load['clients']} clients: {load['tokens_per_s']:.0f} tok/s = {load['ratio_to_offline']:.2f}x "
             f"offline; p50 {load['default']['p50_ms']:.0f} ms, p99 {load['default']['p99_ms']:.0f} ms; "
             f"padding efficiency {load['padding_efficiency']:.3f}",
             f"mixed, {mixed['priority_clients']} of {mixed['clients']} clients priority: {mixed['tokens_per_s']:.0f} "
             f"tok/s; priority p50 {mixed['priority']['p50_ms']:.0f} / p99 {mixed['priority']['p99_ms']:.0f} ms, "
             f"default p50 {mixed['default']['p50_ms']:.0f} / p99 {mixed['default']['p99_ms']:.0f} ms",
             f"server exit status after SIGTERM: {r['server_exit']}"]
    return "\n".join(lines)


SERVE_BENCH_DESCRIPTION = ("Start `serve` on a loopback port and measure throughput (against offline encode of the same "
                           "texts, in a fresh process), latency idle and under load, and priority against default "
                           "latency under load.")


def add_serve_bench_arguments(p) -> None:
    from embeddinggemma_jax.hub import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--docstrings", type=int, default=64, help="stdlib docstrings of 50-700 tokens (default: 64)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients under load (default: 32)")
    p.add_argument("--idle-requests", type=int, default=32, help="sequential requests for idle latency (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="CPUs for each side (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="batch rows, offline and in the server (default: 32)")
    p.add_argument("--repeats", type=int, default=2, help="timed offline passes, the fastest counts (default: 2)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `serve` (repeat it), e.g. --server-arg=--max-batch-tokens=512")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_serve_bench(args) -> int:
    r = run(args.model, args.docstrings, args.clients, args.idle_requests, args.threads, args.batch_size, args.repeats,
            tuple(args.server_arg))
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0
