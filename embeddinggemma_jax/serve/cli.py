"""``embeddinggemma-jax serve``: the hosted embeddings API on uvicorn.

SIGTERM (or the first Ctrl+C) starts a drain: new requests get 503, the requests in flight finish,
then the process exits 0. A second Ctrl+C stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from embeddinggemma_jax.hub import DEFAULT_MODEL


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible /v1/embeddings API (and TEI's /embed)",
                       description="An embeddings server: POST /v1/embeddings (OpenAI's schema plus normalize, "
                                   "custom_instruction, prompt_name, truncate, service_tier), POST /embed (Text "
                                   "Embeddings Inference), GET /v1/models, /health, /ready, /metrics. Texts of "
                                   "concurrent requests share batches; priority-tier texts go first.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder, Orbax checkpoint or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (default: float32)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' (default: the hub id, or the folder's name); the "
                        "--model value and the part after the last '/' are accepted as aliases")
    p.add_argument("--batch-size", type=_positive, default=32,
                   help="most rows in one batch (default: 32)")
    p.add_argument("--max-batch-tokens", type=_tokens, default="auto",
                   help="most rows x padded length in one batch: 'auto' (2048 on CPU, no cap on accelerators), "
                        "'none' or N (default: auto). With --batch-size it fixes each length bucket's one "
                        "batch shape")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest a batch waits for more texts of its length bucket after its first text "
                        "arrived, in milliseconds (default: 5)")
    p.add_argument("--max-inputs", type=_positive, default=2048, help="most inputs in one request (default: 2048)")
    p.add_argument("--max-queue", type=_positive, default=8192,
                   help="most texts waiting for the device; a request that would pass it gets 429 with "
                        "Retry-After (default: 8192; at least --max-inputs)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB; larger gets 413 "
                                                                       "(default: 32)")
    p.add_argument("--api-key-file", default=None,
                   help="file with one accepted API key per line; requests then need 'Authorization: Bearer "
                        "<key>' (/health, /ready and /metrics stay open)")
    p.add_argument("--warmup", default="all", choices=["all", "none"],
                   help="'all': compile every batch shape before GET /ready answers 200 (default); 'none': ready "
                        "once loaded, each shape compiles on first use (set EMBEDDINGGEMMA_JAX_COMPILATION_CACHE "
                        "to keep compiled shapes between runs)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--test-step-gate", default=None, help=argparse.SUPPRESS)  # tests: hold batches while FILE exists
    p.set_defaults(func=cmd_serve)


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _tokens(s: str):
    if s in ("auto", "none"):
        return None if s == "none" else s
    return _positive(s)


def cmd_serve(args) -> int:
    import uvicorn

    from embeddinggemma_jax.serve.app import Service, ServeConfig, create_app, load_api_keys

    if args.max_queue < args.max_inputs:
        raise ValueError(f"--max-queue {args.max_queue} is below --max-inputs {args.max_inputs}: a request of "
                         f"--max-inputs texts could never be queued; raise --max-queue")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(model=args.model, dtype=args.dtype, served_model_name=args.served_model_name,
                         batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                         max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs, max_queue=args.max_queue,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         api_keys=load_api_keys(args.api_key_file) if args.api_key_file else (),
                         warmup=args.warmup == "all", step_gate=Path(args.test_step_gate) if args.test_step_gate else None)
    service = Service(config)
    log = logging.getLogger("embeddinggemma_jax.serve")
    log.info("serving %s as %r on http://%s:%d (dtype %s%s); GET /ready answers 200 once the model is loaded "
             "and every batch shape compiled", args.model, config.model_names()[0], args.host, args.port,
             args.dtype, ", API keys required" if config.api_keys else "")
    server = _DrainingServer(uvicorn.Config(create_app(service), host=args.host, port=args.port,
                                            log_level=args.log_level, access_log=False, lifespan="on"), service)
    server.run()
    return 0 if service.failure is None else 1


class _DrainingServer:
    """uvicorn's Server, except that the first SIGTERM/SIGINT drains before exiting (uvicorn's own
    handler stops listening at once and re-raises the signal, so the exit status would not be 0)."""

    def __new__(cls, config, service):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if service.state in ("draining", "stopped"):
                    if sig == signal.SIGINT:  # a second Ctrl+C: stop now
                        self.force_exit = self.should_exit = True
                    return
                service.begin_drain()

            async def on_tick(self, counter: int) -> bool:
                if service.state == "draining" and service.in_flight == 0:
                    return True
                return await super().on_tick(counter)

        return Server(config)
