"""The wrapper every route of the server runs in (``endpoint``): admission of an embedding request (draining,
API key, readiness, requests in flight, JSON content type), the body under its size and time limits, errors
as OpenAI error objects (never a traceback), and the request and latency metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from embeddinggemma_jax.serve.schemas import ApiError

log = logging.getLogger("embeddinggemma_jax.serve")


class Disconnected(Exception):
    """The client went away before its answer: logged in one line, counted apart from errors (status 499)."""




class _AsciiJSON(JSONResponse):
    """Error bodies quote what the client sent, which may hold a lone surrogate: escaped, it is still JSON."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error(e: ApiError) -> JSONResponse:
    return _AsciiJSON(e.body(), status_code=e.status, headers=e.headers)


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone (call once the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json_content_type(request: Request) -> None:
    """POST bodies must say they are JSON: a browser page can send a form or text/plain to any origin without
    asking first (no CORS preflight), but not application/json."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the request's Content-Type is {media or 'missing'!r}; send the JSON body with "
                            f"'Content-Type: application/json'", code="unsupported_media_type")


def _admit(service, request: Request) -> None:
    """An embedding request's admission, in order: not draining (503), counted in flight, a valid API key (401),
    the model ready (503), at most ``--max-requests-in-flight`` (429), a JSON body (415). The caller has
    counted the request in ``service.in_flight`` (and uncounts it when done)."""
    cfg = service.config
    service.check_key(request)
    if service.state != "ready":
        raise ApiError(503, f"the model is not ready yet ({service.state}"
                            f"{': ' + service.failure if service.failure else ''}); "
                            f"retry when GET /ready answers 200", type="server_error",
                       code="not_ready", headers={"Retry-After": "5"})
    if service.in_flight > cfg.max_requests_in_flight:
        raise service._limit(429, f"{service.in_flight - 1} requests are in flight",
                             "--max-requests-in-flight", cfg.max_requests_in_flight,
                             "retry later", param=None, code="requests_in_flight")
    _json_content_type(request)


def _refuse_when_draining(service) -> None:
    if service.state in ("draining", "stopped"):
        raise ApiError(503, "the server is shutting down; send the request to another replica",
                       type="server_error", code="shutting_down")


def _failure_response(service, route: str, request: Request, e: Exception) -> Response:
    """The response for a request that raised: its error object, 499 for a client gone, 500 for a bug."""
    if isinstance(e, ApiError):
        return _error(e)
    if isinstance(e, (Disconnected, ClientDisconnect)):
        client = request.client
        log.info("client %s disconnected %s on %s", f"{client.host}:{client.port}" if client else "?",
                 e or "while sending its request", route)
        service.metrics.disconnects.labels(route).inc()
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    log.exception("unexpected error on %s", route, exc_info=e)
    return _error(ApiError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error"))


def endpoint(service, route: str, *, embeds: bool):
    """The wrapper around every route's handler: admission, the body (size and time limits), errors as
    error objects, and the request and latency metrics. An embedding handler gets (request, body, gone) and
    returns (response, tier); the others get the request and return the response."""
    cfg = service.config

    def wrap(handler):
        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            tier, counted, gone = "default", False, None
            try:
                if embeds:
                    _refuse_when_draining(service)
                    service.in_flight += 1
                    counted = True
                    _admit(service, request)
                    body = await _read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
                    gone = asyncio.ensure_future(_until_disconnect(request))
                    response, tier = await handler(request, body, gone)
                else:
                    response = await handler(request)
            except Exception as e:  # noqa: BLE001 - one error object, never a traceback to the client
                response = _failure_response(service, route, request, e)
            finally:
                if counted:
                    service.in_flight -= 1
                if gone is not None:
                    gone.cancel()
            service.metrics.requests.labels(route, str(response.status_code)).inc()
            if embeds:
                service.metrics.latency.labels(route, tier).observe(time.perf_counter() - t0)
            return response
        return run
    return wrap


async def http_error(request, exc: HTTPException):
    """Starlette's own 404 and 405 as OpenAI error objects."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = {404: f"no route {request.url.path}; this server answers POST /v1/embeddings, POST /embed, "
                f"GET /v1/models, /health, /ready, /metrics",
           405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return _error(ApiError(exc.status_code, msg, code=code))


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and with 408 when it has
    not all arrived ``timeout`` seconds after the headers (a stalled client holds no slot for ever)."""
    too_big = ApiError(413, f"the request body exceeds this server's limit of {limit} bytes (--max-body-mb); send "
                            f"fewer or shorter inputs per request", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s of its headers (--body-timeout-s "
                            f"{timeout:g}; {size} bytes came); send it at once", code="request_timeout",
                       headers={"Connection": "close"}) from None
    return b"".join(chunks)


__all__ = ["Disconnected", "endpoint", "http_error"]
