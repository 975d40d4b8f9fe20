"""``embeddinggemma-jax serve``: the hosted embeddings API on uvicorn.

SIGTERM (or the first Ctrl+C) starts a drain: new requests get 503, the requests in flight finish,
then the process exits 0. When they have not finished by ``--drain-timeout-s`` after the signal, the
connections still open are cut (each named in the log; 0.5 s before the deadline, so that the process has
exited by it) and the process exits 3. A second Ctrl+C stops
at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from embeddinggemma_jax import options
from embeddinggemma_jax.serve.config import ServeOptions

SERVE_DESCRIPTION = ("An embeddings server: POST /v1/embeddings (OpenAI's schema plus normalize, custom_instruction, "
                     "prompt_name, truncate, service_tier), POST /embed (Text Embeddings Inference), GET /v1/models, "
                     "/health, /ready, /metrics. Texts of concurrent requests share batches; priority-tier texts go "
                     "first. Needs the serve extra: pip install 'embeddinggemma-jax[serve]'.")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, ServeOptions)


def cmd_serve(args, step_gate=None) -> int:
    """``step_gate``: a callable the worker asks before each batch, passed by a test (``Service``); while it
    returns True no batch is taken."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("serve needs Starlette, uvicorn and prometheus-client: pip install "
                          "'embeddinggemma-jax[serve]'") from None
    from embeddinggemma_jax.serve.app import Service, create_app

    opts = options.build(ServeOptions, args)
    log = logging.getLogger("embeddinggemma_jax.serve")
    # A handler of its own: the root logger may already be configured by an imported library.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(opts.log_level.upper())
    log.propagate = False
    service = Service(opts, step_gate=step_gate)
    log.info(
        "serving %s as %r on http://%s:%d (dtype %s%s); GET /ready answers 200 once the model is loaded and "
        "every batch shape compiled", opts.model, opts.model_names()[0], opts.host, opts.port, opts.dtype,
        ", API keys required" if service.api_keys else "")
    config = uvicorn.Config(create_app(service), host=opts.host, port=opts.port, log_level=opts.log_level,
                            access_log=False, lifespan="on", limit_concurrency=opts.max_connections,
                            http=_protocol(opts.header_timeout_s, log))
    server = _draining_server(config, service, opts.drain_timeout_s, log)
    server.run()
    if server.cut:
        # Past the deadline: no orderly teardown (joining the worker, the runtime's exit handlers) that could
        # take seconds more; the log is written line by line already.
        sys.stderr.flush()
        os._exit(3)
    return 0 if service.failure is None else 1


CUT_MARGIN_S = 0.5  # seconds before --drain-timeout-s at which the connections left are cut


def _protocol(header_timeout: float, log):
    """uvicorn's h11 protocol, plus a deadline for a request's headers: a connection that has sent part of a
    request line or headers and no more within ``header_timeout`` seconds is closed (uvicorn's own keep-alive
    timeout only covers connections idle between requests)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout takes over

        def _headers_late(self):
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "?"
                log.info("closed the connection from %s: no complete request headers within %g s "
                         "(--header-timeout-s)", client, header_timeout)
                self.transport.close()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def _draining_server(config, service, drain_timeout: float, log):
    """uvicorn's Server, except that the first SIGTERM/SIGINT drains before exiting (uvicorn's own
    handler stops listening at once and re-raises the signal, so the exit status would not be 0), and a
    drain that has not ended after ``drain_timeout`` seconds cuts the connections left (``cut`` names them)."""
    import uvicorn

    class Server(uvicorn.Server):
        cut: list[str] = []
        _drain_started: float | None = None

        def handle_exit(self, sig, frame):
            if service.state in ("draining", "stopped"):
                if sig == signal.SIGINT:  # a second Ctrl+C: stop now
                    self.force_exit = self.should_exit = True
                return
            self._drain_started = time.monotonic()
            service.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            if (service.state == "draining" and service.in_flight == 0) or service.state == "failed":
                return True  # drained; or the model could not load, and a supervisor should see the exit
            # Cut a little before the deadline, so that the process is gone by it (exiting takes ~0.3 s).
            if (service.state == "draining" and self._drain_started is not None
                    and time.monotonic() - self._drain_started >= max(0.0, drain_timeout - CUT_MARGIN_S)):
                self._cut_connections()
                return True
            return await super().on_tick(counter)

        def _cut_connections(self) -> None:
            conns = list(self.server_state.connections)
            self.cut = [("%s:%d" % c.client if c.client else "?")
                        + (" (request unfinished)" if c.cycle is not None and not c.cycle.response_complete else
                           " (idle)") for c in conns] or ["none open; requests still in flight"]
            log.error("the drain did not end within %g s (--drain-timeout-s) with %d request(s) in flight; cutting "
                      "%d connection(s): %s; exiting with status 3", drain_timeout, service.in_flight, len(conns),
                      ", ".join(self.cut))
            for c in conns:
                c.transport.abort()
            self.force_exit = True

    return Server(config)
