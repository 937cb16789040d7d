"""An Ollama request as the proxy sees it, and the proxy's answer as the Ollama client sees it.

The proxy (``ingress/proxy.py``) already does everything a model request needs: the guard, admission, waiting
for a start or a swap, the retry after a dead runtime, metrics and telemetry. So an Ollama request is not served
by a second proxy: it is handed to the same one as the OpenAI request it translates to (``shapes.py``), through
this object, which stands in for the front door's ``Request``. What the proxy writes back (a whole OpenAI answer,
an event stream, the gateway's own errors) is turned into Ollama's shapes here on its way to the client:
``application/json`` or NDJSON, errors as ``{"error": "..."}``. Nothing on the ``/v1`` path changes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from athanor.ollama import shapes

if TYPE_CHECKING:
    from athanor.ingress.wire import Headers, Request

JSON = [("Content-Type", "application/json; charset=utf-8")]
NDJSON = [("Content-Type", "application/x-ndjson")]


class OllamaExchange:
    """Stands in for ``wire.Request`` for one translated request: a ``wire.ClientExchange``, what the proxy's
    coroutine path and the guard use of a request."""

    __slots__ = ("_client", "_stream", "body", "kind", "method", "model", "path", "started", "status", "target",
                 "translator", "clock")

    # Not the client's: the guard's admissions are remembered by the head they were judged on, and this request's
    # route is not its head's (``guard.Guard.refusal``).
    head_key = None

    def __init__(self, client: Request, route: str, body: bytes, *, kind: str, model: str, stream: bool,
                 clock: shapes.Clock):
        """``kind``: chat, generate, embed or embeddings. ``model``: the name the client asked for, which every
        answer carries back."""
        self._client = client
        self.method, self.path, self.target, self.body = "POST", route, route, body
        self.kind, self.model, self._stream, self.clock = kind, model, stream, clock
        self.started = False
        self.status = 0
        self.translator = (shapes.StreamTranslator(model, clock, generate=kind == "generate")
                           if kind in ("chat", "generate") else None)

    # ------------------------------------------------------------------ what the proxy reads

    @property
    def version(self) -> str:
        return self._client.version

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._client.raw_headers

    @property
    def headers(self) -> Headers:
        return self._client.headers

    @property
    def fields(self) -> dict[bytes, bytes]:
        return self._client.fields

    @property
    def forward(self) -> bytes:
        return self._client.forward

    @property
    def remote(self) -> str | None:
        return self._client.remote

    @property
    def client_gone(self) -> bool:
        return self._client.client_gone

    @property
    def keep_alive(self) -> bool:
        return self._client.keep_alive

    # ------------------------------------------------------------------ what the proxy writes

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes, raw: bytes = b"") -> None:
        """A whole answer: the runtime's completion (or error) as Ollama's object."""
        self.started, self.status = True, status
        if status != 200:
            await self._client.respond(status, JSON, _line({"error": shapes.error_message(body, status)})[:-1])
            return
        try:
            answer = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            await self._client.respond(502, JSON, _line({"error": "the runtime's answer is not JSON"})[:-1])
            self.status = 502
            return
        if self.kind in ("embed", "embeddings"):
            out = shapes.embed_answer(answer, self.model, self.clock, legacy=self.kind == "embeddings")
        else:
            out = shapes.chat_answer(answer, self.model, self.clock, generate=self.kind == "generate")
        if self._stream:  # the client asked for a stream, the runtime answered whole: one line, as Ollama streams
            await self._client.respond(200, NDJSON, _line(out))
        else:
            await self._client.respond(200, JSON, _line(out)[:-1])

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """An event stream begins (or a streaming client is kept waiting while its model loads): NDJSON."""
        self.started, self.status = True, status
        await self._client.start(status, NDJSON)

    async def write(self, data: bytes) -> None:
        if not self.write_now(data):
            await self._client.drain()

    def write_now(self, data: bytes) -> bool:
        """Whole SSE lines from the proxy: each event that carries something becomes one NDJSON object. From a
        callback, as ``wire.Request.write_now``: whether the client can take more now."""
        assert self.translator is not None
        objects = self.translator.feed(data)
        return self._client.write_now(b"".join(_line(obj) for obj in objects) if objects else b"")

    async def drain(self) -> None:
        await self._client.drain()

    async def end(self) -> None:
        translator = self.translator
        if translator is not None and not translator.done:  # a stream without [DONE] still gets its final object
            await self._client.write(_line(translator.final()))
        await self._client.end()

    async def error(self, status: int, message: str, code: str, param: str | None = None, *,
                    headers: list[tuple[str, str]] | None = None) -> None:
        self.started, self.status = True, status
        await self._client.respond(status, [*JSON, *(headers or [])], _line({"error": message})[:-1])


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
