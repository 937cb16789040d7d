"""The gateway's own errors, in the format of the API the client called: OpenAI's error object, Anthropic's on
``/v1/messages``, Ollama's ``{"error": "..."}`` on ``/api/`` (the runtimes' own errors pass as they are)."""

from __future__ import annotations

import json
from typing import Any

ANTHROPIC_PREFIX = "/v1/messages"
OLLAMA_PREFIX = "/api/"
MAX_ECHO = 64  # characters of a client's value repeated in an error message
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    if status == 429:
        kind = "rate_limit_error"
    elif status == 403:
        kind = "permission_error"
    elif status == 401:
        kind = "authentication_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "service_unavailable" if status == 503 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """An error as Anthropic's Messages API shapes it, for clients of ``/v1/messages``."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_bytes(path: str, status: int, message: str, code: str, param: str | None) -> bytes:
    """The JSON body of an error answered to a request for ``path``."""
    if path.startswith(ANTHROPIC_PREFIX):
        return json.dumps(anthropic_error(status, message)).encode()
    if path.startswith(OLLAMA_PREFIX):
        return json.dumps({"error": message}).encode()
    return json.dumps(error_body(status, message, code, param)).encode()


def short(value: str) -> str:
    """A client's value for an error message: quoted, escaped, and cut to a readable length."""
    return repr(value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "...")
