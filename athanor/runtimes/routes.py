"""The routes the gateway serves, one row each: which runtimes answer it, whether its stream can report usage, what
kind of model it needs, whether it takes reasoning controls.

Every set of routes elsewhere is read from this table: the gateway's 404 (``ALL_ROUTES``), each runtime's row in
``launch.RUNTIMES`` (a request for a route its runtime lacks never starts it), the usage the ingress asks a stream
for (``USAGE_ROUTES``), what an embedding or rerank model answers (``TASK_ROUTES``), and the bodies whose
messages and tools are checked before a runtime chokes on them (``MESSAGE_ROUTES``). A new route is one row.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA = "llama-server"
MLX_LM = "mlx-lm"
MLX_VLM = "mlx-vlm"


@dataclass(frozen=True)
class Route:
    """One ``/v1`` route and what answering it takes."""

    runtimes: frozenset[str]  # the runtimes that serve it
    usage: bool = False  # a stream can carry a usage chunk when asked (stream_options.include_usage)
    task: str | None = None  # the model capability it needs (embedding, rerank); None: a generating model
    reasoning: bool = False  # takes reasoning_effort / thinking, mapped to chat_template_kwargs (ingress/requests.py)
    messages: str | None = None  # its body carries chat messages and tools: "required", or "optional"


_ALL = frozenset({LLAMA, MLX_LM, MLX_VLM})
_LLAMA_ONLY = frozenset({LLAMA})

ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route(_ALL, usage=True, reasoning=True, messages="optional"),
    "/v1/completions": Route(_ALL, usage=True),
    "/v1/responses": Route(frozenset({LLAMA, MLX_VLM}), reasoning=True),
    "/v1/embeddings": Route(_LLAMA_ONLY, task="embedding"),
    "/v1/rerank": Route(_LLAMA_ONLY, task="rerank"),
    "/v1/reranking": Route(_LLAMA_ONLY, task="rerank"),
    "/v1/messages": Route(_LLAMA_ONLY, messages="required"),  # Anthropic's Messages API (takes ``thinking`` natively)
    "/v1/messages/count_tokens": Route(_LLAMA_ONLY, messages="required"),
    "/v1/chat/completions/input_tokens": Route(_LLAMA_ONLY, messages="optional"),
    "/v1/responses/input_tokens": Route(_LLAMA_ONLY),
}


def served_by(runtime: str) -> frozenset[str]:
    """The routes ``runtime`` serves."""
    return frozenset(path for path, route in ROUTES.items() if runtime in route.runtimes)


ALL_ROUTES = frozenset(ROUTES)
USAGE_ROUTES = frozenset(path for path, route in ROUTES.items() if route.usage)
REASONING_ROUTES = frozenset(path for path, route in ROUTES.items() if route.reasoning)
MESSAGE_ROUTES = frozenset(path for path, route in ROUTES.items() if route.messages)  # shapes checked (requests.py)
REQUIRES_MESSAGES = frozenset(path for path, route in ROUTES.items() if route.messages == "required")
TASK_ROUTES: dict[str, frozenset[str]] = {
    task: frozenset(path for path, route in ROUTES.items() if route.task == task)
    for task in dict.fromkeys(route.task for route in ROUTES.values() if route.task)
}
