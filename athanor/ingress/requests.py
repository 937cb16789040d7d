"""What a request asks of its model beyond the route: the model's kind, and reasoning controls.

Refusals here are the caller's mistake, answered 400 before anything starts: a chat request to an embedding
model, embeddings from a chat model, ``reasoning_effort`` for a model whose chat template has no thinking mode.
Reasoning controls are mapped to what each runtime understands: both llama-server and mlx_lm.server take
``chat_template_kwargs.enable_thinking`` (Qwen3-style templates); llama-server also reads ``reasoning_effort``
itself. Anthropic's ``/v1/messages`` takes ``thinking`` natively and is passed as it is.
"""

from __future__ import annotations

from typing import Any

from athanor.runtimes.routes import REASONING_ROUTES, TASK_ROUTES

_TASK_ONLY = frozenset().union(*TASK_ROUTES.values())


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
