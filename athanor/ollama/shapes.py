"""Ollama's request and answer shapes, to and from the OpenAI ones the runtimes speak. Pure functions: no I/O.

Requests: ``/api/chat`` becomes ``/v1/chat/completions``; ``/api/generate`` becomes a one-turn chat (its prompt as
the user's message, so the model's template applies, as Ollama does) or, with ``raw``, ``/v1/completions``;
``/api/embed`` and ``/api/embeddings`` become ``/v1/embeddings``. ``options`` map to the runtime's sampling fields,
``format`` to ``response_format``, ``think`` to ``reasoning_effort`` (which the proxy maps per runtime), images to
data URLs, tool-call arguments from objects to the JSON strings OpenAI carries.

Answers: an OpenAI completion becomes Ollama's final object (``done: true``, ``done_reason``, the counts and the
durations in nanoseconds, filled from llama-server's own ``timings`` where it sends them); a stream's chunks become
NDJSON objects (``StreamTranslator``), tool calls whole (OpenAI streams their arguments in pieces; Ollama clients
expect each call complete).

A request that cannot be translated raises ``BadRequest`` with a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

# options -> the OpenAI (or llama-server/mlx-lm extension) field, for the sampling both runtimes take.
OPTION_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "stop": "stop", "num_predict": "max_tokens", "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "typical_p": "typical_p",
    "repeat_last_n": "repeat_last_n",
}
# Options about how Ollama loads a model: athanor's preset decides them, so they are accepted and not used.
LOAD_OPTIONS = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                          "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
                          "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline"})
_NUMBER_OPTIONS = frozenset({"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                             "frequency_penalty", "typical_p"})
_INT_OPTIONS = frozenset({"top_k", "seed", "num_predict", "repeat_last_n", "num_ctx"})
_KNOWN_OPTIONS = ", ".join(sorted({*OPTION_FIELDS, "num_ctx"}))
_THINK_LEVELS = frozenset({"high", "medium", "low"})
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop",
           "function_call": "stop"}
_IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                (b"RIFF", "image/webp"), (b"BM", "image/bmp"))
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_TAG = re.compile(r"^(?P<name>.+?)(?::(?P<tag>[\w.-]+))?$")


class BadRequest(ValueError):
    """A request Ollama's API would refuse (400): the message says which field and why."""


# ---------------------------------------------------------------------------------------------- names


def model_name(body: dict[str, Any]) -> str:
    """The model a request names (``model``, or ``name`` as older clients send)."""
    name = body.get("model", body.get("name"))
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("model is required: name a model (GET /api/tags lists them)")
    return name.strip()


def candidates(name: str) -> list[str]:
    """The names an Ollama name may stand for, in order: itself (an athanor name may contain ``:``, as an HF id
    with a file does), then without a ``:latest`` tag, which Ollama adds to untagged names."""
    names = [name]
    if name.endswith(":latest"):
        names.append(name[: -len(":latest")])
    return names


def tagged(name: str) -> str:
    """How a model is listed to Ollama clients: ``name:latest``, as Ollama lists an untagged model. (A name with a
    tag of its own is listed as it is.)"""
    match = _TAG.match(name)
    return name if match and match.group("tag") and "/" not in match.group("tag") else f"{name}:latest"


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class Translated:
    """An Ollama request as the OpenAI request the proxy forwards."""

    route: str
    body: dict[str, Any]
    stream: bool
    num_ctx: int | None = None  # asked for: checked against the context the model is served with


def chat_request(body: dict[str, Any], served_name: str) -> Translated:
    messages = body.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list of {role, content} objects")
    payload: dict[str, Any] = {"model": served_name, "messages": _messages(messages)}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRequest("tools must be a list of {type: function, function: {...}} objects")
        if tools:
            payload["tools"] = [{"type": t.get("type") or "function", **{k: v for k, v in t.items() if k != "type"}}
                                for t in tools]
    return _common(body, payload, CHAT)


def generate_request(body: dict[str, Any], served_name: str) -> Translated:
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    for key in ("suffix", "template"):
        value = body.get(key)
        if value not in (None, ""):
            raise BadRequest(f"{key} is not supported by athanor's Ollama API: the model's own chat template "
                             "applies (use /v1/completions for raw text)")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRequest("system must be a string")
    images = body.get("images")
    if body.get("raw") is True:
        if images:
            raise BadRequest("images need the chat template: drop raw, or use /api/chat")
        return _common(body, {"model": served_name, "prompt": prompt}, COMPLETIONS)
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt, **({"images": images} if images else {})})
    return _common(body, {"model": served_name, "messages": _messages(messages)}, CHAT)


def embed_request(body: dict[str, Any], served_name: str, *, legacy: bool) -> Translated:
    """``/api/embed`` (``input``: a string or a list of them) or the older ``/api/embeddings`` (``prompt``)."""
    key = "prompt" if legacy else "input"
    value = body.get(key)
    if legacy:
        if not isinstance(value, str):
            raise BadRequest("prompt must be a string")
    elif isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise BadRequest("input must be a string or a non-empty list of strings")
    elif not isinstance(value, str):
        raise BadRequest("input must be a string or a non-empty list of strings")
    payload: dict[str, Any] = {"model": served_name, "input": value}
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions <= 0:
            raise BadRequest("dimensions must be a positive integer")
        payload["dimensions"] = dimensions
    options = _options(body)
    return Translated(EMBEDDINGS, payload, False, options.pop("num_ctx", None))


def _common(body: dict[str, Any], payload: dict[str, Any], route: str) -> Translated:
    """What chat and generate share: stream (on unless false), options, format, think."""
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    options = _options(body)
    num_ctx = options.pop("num_ctx", None)
    for key, value in options.items():
        payload[OPTION_FIELDS[key]] = value
    if payload.get("max_tokens") is not None and payload["max_tokens"] < 0:
        del payload["max_tokens"]  # -1 (until done) and -2 (fill the context): the runtime's own limit applies
    fmt = body.get("format")
    if fmt == "json":
        payload["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    elif fmt not in (None, ""):
        raise BadRequest('format must be "json" or a JSON schema object')
    think = body.get("think")
    if think is not None and route == CHAT:
        if isinstance(think, bool):
            payload["reasoning_effort"] = "medium" if think else "none"
        elif think in _THINK_LEVELS:
            payload["reasoning_effort"] = think
        else:
            raise BadRequest('think must be true, false, or one of "high", "medium", "low"')
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest("logprobs must be true or false")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20):
        raise BadRequest("top_logprobs must be an integer from 0 to 20")
    if logprobs and route == CHAT:
        payload["logprobs"] = True
        if top:
            payload["top_logprobs"] = top
    elif logprobs:
        raise BadRequest("logprobs need the chat template: drop raw, or use /api/chat")
    payload["stream"] = stream
    if stream:
        payload["stream_options"] = {"include_usage": True}  # the counts of the final object
    return Translated(route, payload, stream, num_ctx)


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object (temperature, top_p, num_predict, ...)")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None or key in LOAD_OPTIONS:
            continue
        if key in _NUMBER_OPTIONS:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BadRequest(f"options.{key} must be a number")
        elif key in _INT_OPTIONS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequest(f"options.{key} must be an integer")
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadRequest("options.stop must be a list of strings")
        else:
            raise BadRequest(f"options.{key} is not an option athanor knows; it takes {_KNOWN_OPTIONS} (and ignores "
                             "Ollama's loading options)")
        out[key] = value
    return out


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI ones. Tool calls get ids (Ollama has none), and a tool's answer the id of the
    latest call of that tool not yet answered, so templates that pair them can."""
    out: list[dict[str, Any]] = []
    pending: dict[str, list[str]] = {}
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"{where}.role must be a string (system, user, assistant or tool)")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string")
        item: dict[str, Any] = {"role": role, "content": content}
        images = message.get("images")
        if images:
            if not isinstance(images, list):
                raise BadRequest(f"{where}.images must be a list of base64 strings")
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
            parts += [{"type": "image_url", "image_url": {"url": _data_url(image, f"{where}.images[{i}]")}}
                      for i, image in enumerate(images)]
            item["content"] = parts
        calls = message.get("tool_calls")
        if calls:
            item["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{i}]", f"call_{index}_{i}", pending)
                                  for i, call in enumerate(calls)]
        if role == "tool":
            tool = message.get("tool_name") or message.get("name")
            ids = pending.get(tool) if isinstance(tool, str) else None
            if ids:
                item["tool_call_id"] = ids.pop(0)
            if isinstance(tool, str):
                item["name"] = tool
        out.append(item)
    return out


def _tool_call(call: Any, where: str, call_id: str, pending: dict[str, list[str]]) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"{where} must be {{function: {{name, arguments}}}}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        text = arguments  # already a JSON string, as some clients send it
    elif isinstance(arguments, dict):
        text = json.dumps(arguments)
    else:
        raise BadRequest(f"{where}.function.arguments must be an object")
    pending.setdefault(function["name"], []).append(call_id)
    return {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": text}}


def _data_url(image: Any, where: str) -> str:
    if not isinstance(image, str) or not image:
        raise BadRequest(f"{where} must be a base64 string")
    if image.startswith("data:"):
        return image
    if not _BASE64.fullmatch(image):
        raise BadRequest(f"{where} is not base64")
    head = "".join(image[:96].split())[:64]
    try:
        head = base64.b64decode(head[: len(head) // 4 * 4])
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not base64") from None
    kind = next((mime for magic, mime in _IMAGE_TYPES if head.startswith(magic)), "image/png")
    return f"data:{kind};base64,{image}"


# ---------------------------------------------------------------------------------------------- answers


def now_rfc3339() -> str:
    """Ollama's ``created_at``: UTC to the microsecond."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Clock:
    """One request's times, for the durations of its final object (nanoseconds)."""

    arrived: float = field(default_factory=time.monotonic)
    waited: Callable[[], float] = lambda: 0.0  # seconds it waited for its model to load (or be swapped in)

    def durations(self, usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> dict[str, int]:
        """The final object's counts and durations. Counts from the usage; durations from the runtime's own timings
        where it sends them (llama-server), otherwise the time after the load, all of it counted as generation."""
        total = time.monotonic() - self.arrived
        load = min(self.waited(), total)
        usage = usage or {}
        timings = timings or {}
        # The prompt's tokens, all of them: llama-server's prompt_n leaves out what its cache already held.
        prompt_n = usage.get("prompt_tokens", timings.get("prompt_n"))
        eval_n = usage.get("completion_tokens", timings.get("predicted_n"))
        prompt_s = _seconds(timings.get("prompt_ms"))
        eval_s = _seconds(timings.get("predicted_ms"))
        if eval_s is None:
            eval_s = max(total - load - (prompt_s or 0.0), 0.0)
        out = {"total_duration": _ns(total), "load_duration": _ns(load)}
        if isinstance(prompt_n, int):
            out["prompt_eval_count"] = prompt_n
        out["prompt_eval_duration"] = _ns(prompt_s or 0.0)
        if isinstance(eval_n, int):
            out["eval_count"] = eval_n
        out["eval_duration"] = _ns(eval_s)
        return out


def _seconds(ms: Any) -> float | None:
    return ms / 1000 if isinstance(ms, (int, float)) and not isinstance(ms, bool) else None


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def done_reason(finish: Any) -> str:
    return _FINISH.get(finish, "stop") if isinstance(finish, str) else "stop"


def tool_calls_out(calls: Any) -> list[dict[str, Any]] | None:
    """OpenAI tool calls as Ollama's: arguments an object (a string that is not JSON stays under ``arguments``
    as ``{"raw": ...}``, never dropped)."""
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments: Any = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                arguments = {"raw": arguments}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        out.append({"function": {"index": index, "name": function.get("name") or "", "arguments": arguments}})
    return out or None


def chat_answer(answer: dict[str, Any], model: str, clock: Clock, *, generate: bool) -> dict[str, Any]:
    """A whole OpenAI chat (or text) completion as Ollama's final object."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") if "message" in choice else choice.get("text")
    thinking = message.get("reasoning_content") or message.get("reasoning")
    out: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if generate:
        out["response"] = text or ""
        if thinking:
            out["thinking"] = thinking
    else:
        reply: dict[str, Any] = {"role": "assistant", "content": text or ""}
        if thinking:
            reply["thinking"] = thinking
        calls = tool_calls_out(message.get("tool_calls"))
        if calls:
            reply["tool_calls"] = calls
        out["message"] = reply
    logprobs = logprobs_out(choice.get("logprobs"))
    if logprobs:
        out["logprobs"] = logprobs
    out.update({"done": True, "done_reason": done_reason(choice.get("finish_reason"))})
    out.update(clock.durations(answer.get("usage"), answer.get("timings")))
    return out


def logprobs_out(logprobs: Any) -> list[dict[str, Any]] | None:
    """OpenAI's chat logprobs (``content``: token, logprob, top_logprobs) as Ollama's list; bytes are left out."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out = []
    for item in content:
        if not isinstance(item, dict):
            continue
        entry: dict[str, Any] = {"token": item.get("token", ""), "logprob": item.get("logprob", 0.0)}
        top = item.get("top_logprobs")
        if isinstance(top, list) and top:
            entry["top_logprobs"] = [{"token": t.get("token", ""), "logprob": t.get("logprob", 0.0)}
                                     for t in top if isinstance(t, dict)]
        out.append(entry)
    return out or None


def embed_answer(answer: dict[str, Any], model: str, clock: Clock, *, legacy: bool) -> dict[str, Any]:
    data = sorted(answer.get("data") or [], key=lambda item: item.get("index", 0))
    vectors = [item.get("embedding") for item in data]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    usage = answer.get("usage") or {}
    timing = clock.durations(None, None)
    out: dict[str, Any] = {"model": model, "embeddings": vectors, "total_duration": timing["total_duration"],
                           "load_duration": timing["load_duration"]}
    if isinstance(usage.get("prompt_tokens"), int):
        out["prompt_eval_count"] = usage["prompt_tokens"]
    return out


def error_message(body: bytes, status: int) -> str:
    """The message of a runtime's (or the gateway's) error answer, whatever its shape."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or f"the runtime answered HTTP {status}"
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(parsed.get("message"), str):
            return parsed["message"]
    return f"the runtime answered HTTP {status}"


class StreamTranslator:
    """An OpenAI event stream, line by line, as Ollama's NDJSON objects. Content and thinking pass as they come;
    tool calls are gathered and sent whole when the choice finishes; the final object (``done: true``) comes at
    ``[DONE]`` (or at the end of a stream that had none), with the counts of the usage chunk."""

    def __init__(self, model: str, clock: Clock, *, generate: bool):
        self.model, self.clock, self.generate = model, clock, generate
        self.finish: Any = None
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.done = False

    def feed(self, lines: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line in lines.splitlines():
            if not line.startswith(b"data:") or self.done:
                continue  # comments (keep-alives while loading), event names, blank separators
            data = line[5:].strip()
            if data == b"[DONE]":
                out.append(self.final())
                continue
            try:
                event = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(event, dict):
                continue
            if "error" in event:
                self.done = True
                out.append({"error": error_message(data, 500)})
                continue
            out.extend(self._chunk(event))
        return out

    def _chunk(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        out = []
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if "delta" in choice else {"content": choice.get("text")}
            delta = delta if isinstance(delta, dict) else {}
            for call in delta.get("tool_calls") or []:
                self._gather(call)
            text = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
            logprobs = logprobs_out(choice.get("logprobs"))
            if text or thinking or logprobs:
                piece = self._object(text, thinking, None)
                if logprobs:
                    piece["logprobs"] = logprobs
                out.append(piece)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                if self.calls:
                    calls = [self.calls[i] for i in sorted(self.calls)]
                    self.calls = {}
                    out.append(self._object("", "", tool_calls_out(calls)))
        return out

    def _gather(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        index = call.get("index", len(self.calls))
        gathered = self.calls.setdefault(index, {"function": {"name": "", "arguments": ""}})
        function = call.get("function") or {}
        if function.get("name"):
            gathered["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            gathered["function"]["arguments"] += function["arguments"]

    def _object(self, text: str, thinking: str, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339()}
        if self.generate:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        out["done"] = False
        return out

    def final(self) -> dict[str, Any]:
        self.done = True
        out = self._object("", "", tool_calls_out([self.calls[i] for i in sorted(self.calls)]) if self.calls else None)
        out.update({"done": True, "done_reason": done_reason(self.finish)})
        out.update(self.clock.durations(self.usage, self.timings))
        return out


# ---------------------------------------------------------------------------------------------- keep_alive

_GO_DURATION = re.compile(r"^(-?)((?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+)$")
_GO_UNIT = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's ``keep_alive``: None when absent (the model's own idle limit applies), 0 to unload after the
    request, ``inf`` to keep it loaded (any negative value), else seconds. A number is seconds; a string is a number
    of seconds or a Go duration (``5m``, ``1h30m``, ``-1m``)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            match = _GO_DURATION.match(text)
            if not match:
                raise BadRequest(f"keep_alive {value[:40]!r} is not a duration: use seconds (300) or a duration such "
                                 'as "5m", "1h"; 0 unloads, a negative value keeps the model loaded') from None
            seconds = sum(float(n) * _GO_SECONDS[unit] for n, unit in _GO_UNIT.findall(match.group(2)))
            if match.group(1):
                seconds = -seconds
    else:
        raise BadRequest("keep_alive must be a number of seconds or a duration string")
    if math.isnan(seconds):
        raise BadRequest("keep_alive must be a number of seconds or a duration string")
    return math.inf if seconds < 0 else seconds
