"""``embeddinggemma-jax serve``: the hosted embeddings API on uvicorn.

SIGTERM (or the first Ctrl+C) starts a drain: new requests get 503, the requests in flight finish,
then the process exits 0. A second Ctrl+C stops at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

from embeddinggemma_jax import options
from embeddinggemma_jax.serve.config import ServeOptions

SERVE_DESCRIPTION = ("An embeddings server: POST /v1/embeddings (OpenAI's schema plus normalize, custom_instruction, "
                     "prompt_name, truncate, service_tier), POST /embed (Text Embeddings Inference), GET /v1/models, "
                     "/health, /ready, /metrics. Texts of concurrent requests share batches; priority-tier texts go "
                     "first. Needs the serve extra: pip install 'embeddinggemma-jax[serve]'.")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, ServeOptions)
    p.add_argument("--test-step-gate", metavar="FILE", default=None, help=argparse.SUPPRESS)


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ImportError("serve needs Starlette, uvicorn and prometheus-client: pip install "
                          "'embeddinggemma-jax[serve]'") from None
    from embeddinggemma_jax.serve.app import Service, create_app

    opts = dataclasses.replace(options.build(ServeOptions, args), test_step_gate=args.test_step_gate)
    log = logging.getLogger("embeddinggemma_jax.serve")
    # A handler of its own: the root logger may already be configured by an imported library.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(opts.log_level.upper())
    log.propagate = False
    service = Service(opts)
    log.info(
        "serving %s as %r on http://%s:%d (dtype %s%s); GET /ready answers 200 once the model is loaded and "
        "every batch shape compiled", opts.model, opts.model_names()[0], opts.host, opts.port, opts.dtype,
        ", API keys required" if service.api_keys else "")
    config = uvicorn.Config(create_app(service), host=opts.host, port=opts.port, log_level=opts.log_level,
                            access_log=False, lifespan="on")
    _draining_server(config, service).run()
    return 0 if service.failure is None else 1


def _draining_server(config, service):
    """uvicorn's Server, except that the first SIGTERM/SIGINT drains before exiting (uvicorn's own
    handler stops listening at once and re-raises the signal, so the exit status would not be 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if service.state in ("draining", "stopped"):
                if sig == signal.SIGINT:  # a second Ctrl+C: stop now
                    self.force_exit = self.should_exit = True
                return
            service.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            if (service.state == "draining" and service.in_flight == 0) or service.state == "failed":
                return True  # drained; or the model could not load, and a supervisor should see the exit
            return await super().on_tick(counter)

    return Server(config)
