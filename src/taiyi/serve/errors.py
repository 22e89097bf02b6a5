"""API errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI's clients turn the HTTP status into an exception class and show ``message``; ``code`` says what
went wrong in a word a program can test, and ``param`` names the offending field.
"""

from __future__ import annotations

from typing import Any

# Status → OpenAI error type. OpenAI uses invalid_request_error for every client mistake, 401 included.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# Codes for errors raised outside our handlers (Starlette's own 404/405, ...).
_DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "queue_full",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def default_code(status: int) -> str:
    return _DEFAULT_CODES.get(status, f"http_{status}")


def error_body(message: str, status: int, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code or default_code(status),
        }
    }


class APIError(Exception):
    """An error answered to the client as OpenAI does; ``message`` is one line saying what to do.

    Args:
        status: HTTP status.
        message: one line for the user.
        code: a word for programs (``invalid_size``, ``queue_full`` ...); defaults by status.
        param: the request field at fault.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or default_code(status)
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, code=self.code, param=self.param)


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)
