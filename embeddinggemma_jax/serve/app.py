"""The ASGI application: routes, authentication, limits, lifecycle and the bridge to the worker thread.

Starlette (not FastAPI): the request bodies are validated by ``schemas`` so that every rejection is
OpenAI's error object naming the field, which FastAPI's automatic 422 answers would have to be undone
for, and the server needs no generated OpenAPI pages. uvicorn serves it (see ``serve.cli``).
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import hmac
import logging
import threading
import time
from typing import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embeddinggemma_jax.head import apply_dimensions
from embeddinggemma_jax.serve.engine import BatchingWorker, Job, QueueFull
from embeddinggemma_jax.batching import resolve_max_batch_tokens
from embeddinggemma_jax.serve.config import SERVE_CPU_MAX_BATCH_TOKENS, ServeOptions
from embeddinggemma_jax.serve.metrics import Metrics
from embeddinggemma_jax.serve import middleware
from embeddinggemma_jax.serve.middleware import Disconnected
from embeddinggemma_jax.serve.schemas import ApiError, EmbedRequest, parse_json, parse_openai, parse_tei
from embeddinggemma_jax.tokenize import TooManyCharacters

log = logging.getLogger("embeddinggemma_jax.serve")

TOKENIZE_CHUNK = 256  # texts tokenised per step: the request's token limit is checked after each


class Service:
    """What the routes share: the model (once loaded), the worker, the metrics and the lifecycle state."""

    def __init__(self, config: ServeOptions, model=None, step_gate: Callable[[], bool] | None = None):
        """``model``: an ``EmbeddingGemma`` already loaded (else ``config.model`` is loaded); ``step_gate``: a
        test's hook, passed to the worker (while it returns True, no batch is taken)."""
        self.config = config
        self.step_gate = step_gate
        self.api_keys = config.api_keys()  # read once: a missing or empty file fails before the model loads
        self.model = model
        self.metrics = Metrics()
        self.worker: BatchingWorker | None = None
        self.state = "loading"  # -> warming -> ready -> draining; or failed
        self.failure: str | None = None
        self.in_flight = 0
        self.tokens_in_flight = 0  # reserved (an upper bound) before tokenising, the real count after
        self.warm_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Load the model, start the worker and compile every batch shape; runs on a thread of its own."""
        try:
            import jax

            from embeddinggemma_jax import EmbeddingGemma

            c = self.config
            t0 = time.perf_counter()
            if self.model is None:
                cap = resolve_max_batch_tokens(c.max_batch_tokens, cpu=SERVE_CPU_MAX_BATCH_TOKENS)
                self.model = EmbeddingGemma.from_pretrained(c.model, dtype=c.dtype, max_batch_tokens=cap,
                                                            quantize=c.quantize)
            log.info("loaded %s (%s) in %.1f s: dtype %s, %d %s device(s)", c.model, self.model.source,
                     time.perf_counter() - t0, self.model.dtype, jax.local_device_count(), jax.default_backend())
            self.worker = BatchingWorker(self.model, batch_size=c.batch_size, max_wait=c.max_wait_ms / 1000.0,
                                         max_queue=c.max_queue, metrics=self.metrics,
                                         step_gate=self.step_gate)
            self.state = "warming"
            shapes = self.worker.shapes()
            log.info("batch shapes (rows x length), one per length bucket: %s",
                     ", ".join(f"{r}x{L}" for r, L in shapes))
            if c.warmup == "all":
                self.warm_seconds = self.worker.warm(log.debug)
                log.info("compiled (or loaded from the compilation cache) %d shapes in %.1f s", len(shapes),
                         self.warm_seconds)
            log.info("ready")
            self.worker.start()
            if self.state == "warming":
                self.state = "ready"
        except Exception as e:  # noqa: BLE001 - reported by /ready and the log; the process keeps answering
            self.state, self.failure = "failed", f"{type(e).__name__}: {e}"
            log.error("could not start the model: %s", self.failure)

    def begin_drain(self) -> None:
        if self.state != "draining":
            log.info("shutting down: refusing new requests, finishing %d in flight", self.in_flight)
            self.state = "draining"

    def stop(self) -> None:
        self.state = "stopped"
        if self.worker is not None:
            self.worker.stop(timeout=10)

    # ------------------------------------------------------------------ embedding
    def check_key(self, request: Request) -> None:
        keys = self.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key, in constant time each, so neither the time nor the log tells which
        # key (or how much of one) matched.
        ok = False
        for k in keys:
            ok |= hmac.compare_digest(given, k.encode())
        if not ok:
            raise ApiError(401, "missing or invalid API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _limit(self, status: int, what: str, flag: str, value, advice: str, param: str | None = "input",
               code: str = "request_too_large") -> ApiError:
        """A refusal that names the limit (its flag and value) and what to do."""
        self.metrics.limited.labels(flag.lstrip("-")).inc()
        kw = dict(type="rate_limit_error", headers={"Retry-After": str(self.retry_after())}) if status == 429 else {}
        return ApiError(status, f"{what}, more than this server's limit of {value} ({flag} {value}); {advice}",
                        param=param, code=code, **kw)

    async def embed(self, req: EmbedRequest, gone: asyncio.Future | None = None) -> tuple[np.ndarray, int, int]:
        """-> (vectors [n, d] fp32 with the request's dimensions and normalisation, tokens, batch step).
        ``gone``: resolves when the client disconnects; its work is then dropped before the device."""
        model, c = self.model, self.config
        n = len(req.texts)
        dims = req.dimensions or model.dimensions
        if n * dims * 4 > c.max_response_bytes:  # checked before any work: the answer could not be sent
            raise self._limit(413, f"the response would hold {n} x {dims} floats ({n * dims * 4} bytes)",
                              "--max-response-mb", c.max_response_mb, "send fewer inputs or ask for fewer "
                              "dimensions", param="dimensions" if req.dimensions else "input",
                              code="response_too_large")
        try:
            texts = model.apply_prompt(req.texts, req.prompt_name, req.custom_instruction)
        except ValueError as e:
            raise ApiError(400, str(e), param="input")
        chars = sum(map(len, texts))
        if chars > c.max_request_chars:
            raise self._limit(413, f"the request holds {chars} characters (prompts included)", "--max-request-chars",
                              c.max_request_chars, "split it over several requests")
        limit = model.tokenizer.max_length
        reserved = min(sum(min(limit, 4 * len(t) + 2) for t in texts), c.max_request_tokens)  # >= its tokens
        if self.tokens_in_flight + reserved > c.max_tokens_in_flight:
            raise self._limit(429, f"{self.tokens_in_flight} tokens are in flight and this request may add "
                                   f"{reserved}", "--max-tokens-in-flight", c.max_tokens_in_flight, "retry later",
                              param=None, code="tokens_in_flight")
        self.tokens_in_flight += reserved
        try:
            token_ids = await run_in_threadpool(self._tokenize, texts, req.truncate)
            tokens = sum(map(len, token_ids))
            self.tokens_in_flight += tokens - reserved
            reserved = tokens
            return await self._run(token_ids, req, gone)
        finally:
            self.tokens_in_flight -= reserved

    def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Token ids, a chunk of texts at a time, each text tokenised at most up to ``--max-input-chars``;
        refused as soon as the request's tokens pass ``--max-request-tokens``."""
        c, tok = self.config, self.model.tokenizer
        out, total = [], 0
        for lo in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = texts[lo:lo + TOKENIZE_CHUNK]
            try:
                ids = tok.encode_bounded(chunk, truncate, max_chars=c.max_input_chars, first_index=lo)
            except TooManyCharacters as e:
                raise self._limit(400, f"input {e.index} has {e.chars} characters and its first {tok.max_length} "
                                       f"tokens do not end at a space the tokenizer cannot merge across within "
                                       f"the first {e.max_chars}", "--max-input-chars", c.max_input_chars,
                                  "shorten it", code="input_too_long")
            except ValueError as e:
                raise ApiError(400, str(e), param="input", code="input_too_long" if "tokens" in str(e) else None)
            total += sum(map(len, ids))
            if total > c.max_request_tokens:
                raise self._limit(413, f"the request has more than {total} tokens after truncation (counted through "
                                       f"input {lo + len(chunk) - 1})", "--max-request-tokens",
                                  c.max_request_tokens, "split it over several requests")
            out.extend(ids)
        return out

    async def _run(self, token_ids: list[list[int]], req: EmbedRequest, gone: asyncio.Future | None):
        model = self.model
        if gone is not None and gone.done():
            raise Disconnected("before its texts were queued")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finished(job: Job) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(job))

        job = Job(token_ids, req.service_tier, finished)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            self.metrics.rejected.labels(req.service_tier).inc()
            raise ApiError(429, f"the queue is full ({e.waiting} texts waiting, limit {self.config.max_queue}); "
                                f"retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())})
        if gone is None:
            await done
        else:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                dropped = self.worker.cancel(job)
                raise Disconnected(f"while its texts waited ({dropped} of {len(token_ids)} dropped before the device)")
        if job.error is not None:
            log.error("batch failed: %s: %s", type(job.error).__name__, job.error)
            raise ApiError(500, f"the model failed on this batch: {type(job.error).__name__}: {job.error}",
                           type="server_error", code="internal_error")
        self.metrics.inputs.labels(req.service_tier).inc(len(token_ids))
        self.metrics.tokens.labels(req.service_tier).inc(job.tokens)
        normalize = model.head_config.normalize if req.normalize is None else req.normalize  # as encode decides
        vectors = apply_dimensions(job.out, req.dimensions, normalize).astype(np.float32)
        return vectors, job.tokens, job.last_step

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: its tokens at the worker's measured rate."""
        rate = self.worker.tokens_per_second()
        return max(1, int(np.ceil(self.worker.waiting_tokens() / rate))) if rate else 1


def create_app(service: Service) -> Starlette:
    """The Starlette app serving ``service``; its lifespan loads the model on a background thread."""
    cfg = service.config

    def endpoint(route: str, *, embeds: bool):
        return middleware.endpoint(service, route, embeds=embeds)

    names = cfg.model_names()

    def limits():
        m = service.model
        return dict(prompts=m.prompts, full_dimensions=m.dimensions, max_inputs=cfg.max_inputs)

    @endpoint("/v1/embeddings", embeds=True)
    async def openai_embeddings(request, body, gone):
        req = parse_openai(parse_json(body), model_names=names, **limits())
        vectors, tokens, step = await service.embed(req, gone)
        if req.encoding_format == "base64":
            data = [base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.tolist()
        payload = {"object": "list", "model": names[0],
                   "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return JSONResponse(payload, headers={"x-batch-step": str(step)}), req.service_tier

    @endpoint("/embed", embeds=True)
    async def tei_embed(request, body, gone):
        req = parse_tei(parse_json(body), **limits())
        vectors, tokens, step = await service.embed(req, gone)
        return JSONResponse(vectors.tolist(), headers={"x-batch-step": str(step)}), req.service_tier

    @endpoint("/v1/models", embeds=False)
    async def models(request):
        service.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "embeddinggemma-jax"} for n in names[:1]]})

    @endpoint("/health", embeds=False)
    async def health(request):
        return JSONResponse({"status": "alive"})

    @endpoint("/ready", embeds=False)
    async def ready(request):
        body = {"status": service.state}
        if service.failure:
            body["error"] = service.failure
        if service.warm_seconds is not None:
            body["warm_seconds"] = round(service.warm_seconds, 3)
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @endpoint("/metrics", embeds=False)
    async def metrics(request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=service.load, name="embeddinggemma-load", daemon=True).start()
        yield
        service.stop()

    post, get = ["POST"], ["GET"]
    return Starlette(routes=[Route("/v1/embeddings", openai_embeddings, methods=post),
                             Route("/embeddings", openai_embeddings, methods=post),
                             Route("/embed", tei_embed, methods=post),
                             Route("/v1/models", models, methods=get),
                             Route("/health", health, methods=get),
                             Route("/ready", ready, methods=get),
                             Route("/metrics", metrics, methods=get)],
                     exception_handlers={HTTPException: middleware.http_error}, lifespan=lifespan)
