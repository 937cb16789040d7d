"""What a request asks of its model beyond the route: the model's kind, and reasoning controls; and the shape of
the fields a runtime would take for a fault of its own.

Refusals here are the caller's mistake, answered 400 before anything starts: a chat request to an embedding
model, embeddings from a chat model, ``reasoning_effort`` for a model whose chat template has no thinking mode.
Reasoning controls are mapped to what each runtime understands: both llama-server and mlx_lm.server take
``chat_template_kwargs.enable_thinking`` (Qwen3-style templates); llama-server also reads ``reasoning_effort``
itself. Anthropic's ``/v1/messages`` takes ``thinking`` natively and is passed as it is.
"""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

from athanor.runtimes.routes import MESSAGE_ROUTES, REASONING_ROUTES, REQUIRES_MESSAGES, TASK_ROUTES

_TASK_ONLY: Final = frozenset().union(*TASK_ROUTES.values())
_decode: Final = msgspec.json.Decoder().decode
_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner json.loads ends in
_JSON_SPACE: Final = " \t\n\r"


def json_body(body: bytes) -> Any:
    """``json.loads(body.decode())``: the same value, or the same JSONDecodeError (and UnicodeDecodeError,
    RecursionError), for every body.

    msgspec parses a proxied request's body in a quarter of json's time, and every body it accepts to the value
    json.loads makes of it (integers of any size included; ``tests/test_fast_path.py`` holds it to that). What it
    refuses, json.loads may still take (NaN, Infinity, a number beyond a float's range, an escaped lone
    surrogate) or refuses with its own message, which a client reads in the 400: so those bodies are parsed again
    the standard library's way. There, json.loads finds the whitespace around the value with two regular
    expression calls and wraps the scanner in two Python frames, so the scanner is called directly."""
    try:
        return _decode(body)
    except (msgspec.MsgspecError, RecursionError):
        pass
    text = body.decode()
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = _scan_json(text, start)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if end != len(text):
        end = len(text) - len(text[end:].lstrip(_JSON_SPACE))
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return value


def shape_problem(route: str, payload: dict[str, Any]) -> tuple[str, str] | None:
    """(message, param) when a field a runtime parses has the wrong type, else None.

    llama-server answers a message whose ``role`` is not a string, a malformed tool definition, and a
    Messages request without ``messages`` with a 500 (its JSON library's type errors reach its generic handler): a
    client takes that for a fault of the server and retries it (the openai SDK twice), and the gateway's health
    check counts it toward a test generation. They are the request's fault: a 400, before anything starts."""
    if route not in MESSAGE_ROUTES:
        return None
    messages = payload.get("messages")
    if messages is None and route in REQUIRES_MESSAGES:
        return "'messages' is required", "messages"
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict) and not isinstance(message.get("role"), str):
                return f"messages[{i}].role must be a string", f"messages[{i}].role"
    tools = payload.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "tools must be an array of tool definitions", "tools"
        anthropic = route.startswith("/v1/messages")
        for i, tool in enumerate(tools):
            if not _tool_shaped(tool, anthropic):
                shape = ('{"name": string, "input_schema": object}' if anthropic else
                         '{"type": "function", "function": {"name": string, "parameters": object}}')
                return f"tools[{i}] must be {shape}", f"tools[{i}]"
    return None


def _tool_shaped(tool: Any, anthropic: bool) -> bool:
    if not isinstance(tool, dict):
        return False
    if anthropic:
        return isinstance(tool.get("name"), str) and isinstance(tool.get("input_schema", {}), dict)
    function = tool.get("function")
    return (tool.get("type") == "function" and isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("parameters", {}), dict))


def task_refusal(name: str, route: str, capabilities: list[str]) -> str | None:
    """Why model ``name`` cannot answer ``route`` given what it is (None: it can)."""
    for task, routes in TASK_ROUTES.items():
        if task in capabilities:
            if route in routes:
                return None
            article = "an" if task == "embedding" else "a"
            return f"model {name!r} is {article} {task} model: it answers {', '.join(sorted(routes))}, not {route}"
    if route in _TASK_ONLY:
        wanted = next(task for task, routes in TASK_ROUTES.items() if route in routes)
        article = "an" if wanted == "embedding" else "a"
        return (f"model {name!r} generates text; {route} needs {article} {wanted} model (an encoder GGUF for "
                "embeddings, a reranker GGUF for rerank)")
    return None


def reasoning_changes(name: str, route: str, runtime: str, metadata: dict[str, Any],
                      payload: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(fields to change in the body, or None; an error message, or None) for ``thinking``/``reasoning_effort``."""
    if route not in REASONING_ROUTES:
        return None, None
    effort = payload.get("reasoning_effort")
    thinking = payload.get("thinking")
    if effort is None and thinking is None:
        return None, None
    wants = _wants_thinking(effort, thinking)
    if wants is None:
        return None, ("thinking must be true, false or {\"type\": \"enabled\"|\"disabled\"}; reasoning_effort a "
                      "string such as none, low, medium or high")
    if wants and metadata.get("reasoning") is False:
        return None, (f"model {name!r} has no thinking mode (its chat template has none); drop reasoning_effort "
                      "and thinking, or use a reasoning model")
    kwargs = payload.get("chat_template_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    kwargs["enable_thinking"] = wants
    changes: dict[str, Any] = {"chat_template_kwargs": kwargs}
    if thinking is not None:
        changes["thinking"] = None  # not an OpenAI field: mapped above, dropped below
    if effort is not None and runtime != "llama-server":
        changes["reasoning_effort"] = None  # mlx_lm.server has no such field
    return changes, None


def _wants_thinking(effort: Any, thinking: Any) -> bool | None:
    if thinking is not None:
        if isinstance(thinking, bool):
            return thinking
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
            return thinking["type"] == "enabled"
        return None
    if not isinstance(effort, str):
        return None
    return effort != "none"
