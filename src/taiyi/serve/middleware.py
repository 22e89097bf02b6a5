"""The outer ASGI layer of every request: request id, API key and body cap, all before the body is read.

Written as plain ASGI (not Starlette's ``BaseHTTPMiddleware``) so that the endpoint still receives the
client's disconnect and the body arrives chunk by chunk through the byte counter.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body
from .metrics import Metrics

logger = logging.getLogger("taiyi.serve")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("taiyi_request_id", default="-")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PROTECTED_PREFIXES = ("/v1/", "/sdapi/", "/metrics")


class PayloadTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the cap: FastAPI re-raises HTTPExceptions met while
    reading a body, so the client gets 413 however far the parsing had gone."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than this server's limit of {_size(limit)}")


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class GuardMiddleware:
    """Request id (``X-Request-ID``, echoed), bearer key on ``/v1/*`` and ``/metrics``, body cap, access log.

    Args:
        app: the wrapped application.
        api_key: the key clients must present; None lets everyone in.
        max_body: largest request body in bytes; a bigger ``Content-Length`` is refused before reading, a
            body without one is counted as it arrives and refused as soon as it passes the cap.
        metrics: where answers, latencies and guard errors are counted.
        routes: returns the app's route paths (the only values the ``route`` label takes).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body: int,
        metrics: Metrics,
        routes: Callable[[], frozenset[str]],
    ):
        self.app = app
        self._key = api_key.encode("utf-8") if api_key else None
        self.max_body = max_body
        self.metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope_state = scope.setdefault("state", {})
        scope_state["request_id"] = request_id
        scope_state["arrived"] = time.monotonic()  # the per-request timeout counts from here
        token = request_id_var.set(request_id)
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        async def refuse(code: int, message: str, error: str, headers: dict[str, str] | None = None) -> None:
            self.metrics.error(error)
            body = json.dumps(error_body(message, code, code=error)).encode()
            extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    + extra,
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})

        self.metrics.in_flight.inc()
        try:
            path = scope.get("path", "")
            if self._key is not None and scope["method"] != "OPTIONS" and path.startswith(PROTECTED_PREFIXES):
                failure = self._check_key(_header(scope, b"authorization"))
                if failure is not None:
                    await refuse(401, failure[1], failure[0], {"WWW-Authenticate": "Bearer"})
                    return
            length = _header(scope, b"content-length")
            if length is not None:
                if not length.strip().isdigit():
                    await refuse(400, "Content-Length is not a number", "invalid_request", {"Connection": "close"})
                    return
                if int(length) > self.max_body:
                    await refuse(
                        413,
                        f"request body of {_size(int(length))} is larger than this server's limit of "
                        f"{_size(self.max_body)}",
                        "payload_too_large",
                        {"Connection": "close"},
                    )
                    return
            received = 0

            async def counting_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.disconnect":
                    scope_state["client_gone"] = True  # a body cut short is the client leaving, not a bad request
                elif message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise PayloadTooLarge(self.max_body)
                return message

            try:
                await self.app(scope, counting_receive, send_with_id)
            except PayloadTooLarge as exc:  # raised outside FastAPI's body reading: answer here
                if response_started:
                    raise
                await refuse(413, exc.detail, "payload_too_large", {"Connection": "close"})
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            route = path if path in self._routes() else "other"
            self.metrics.answered(route, status, seconds)
            logger.info("%s %s %s %d %.1f ms", request_id, scope["method"], path[:200], status, seconds * 1000)
            request_id_var.reset(token)

    def _check_key(self, authorization: str | None) -> tuple[str, str] | None:
        """None when the key matches, else (code, message). The key itself is never logged or echoed."""
        if not authorization:
            return "missing_api_key", "this server needs an API key: send the header Authorization: Bearer <key>"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "basic" and token.strip():  # A1111's clients (--api-auth user:password): the key
            try:  # is the password, any user name
                token = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return "invalid_api_key", "the Authorization header's Basic credentials are not base64 user:password"
            if not token:
                return "invalid_api_key", "incorrect API key"
        elif scheme.lower() != "bearer" or not token.strip():
            return (
                "invalid_api_key",
                "the Authorization header must be: Bearer <key> (or Basic with the key as password)",
            )
        if not hmac.compare_digest(token.strip().encode("utf-8"), self._key):
            return "invalid_api_key", "incorrect API key"
        return None


class JSONErrorCORSMiddleware(CORSMiddleware):
    """Starlette's CORS layer, its refused preflights answered in the API's JSON error shape, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # e.g. "origin, headers"
        message = f"this server does not allow that cross-origin request ({refused}); see --cors-origin"
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(error_body(message, 400, code="cors_not_allowed"), status_code=400, headers=headers)
