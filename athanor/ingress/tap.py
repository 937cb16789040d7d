"""What one proxied request tells the metrics: its status, time to first token and the tokens used.

Usage is read where the runtimes put it, cheaply: a regular expression over the bytes of the ``"usage"`` object
alone, never a JSON parse of the answer. A stream whose client did not ask for usage is asked for it anyway (the
ingress adds ``stream_options.include_usage``), and the usage-only event is cut from what the client gets.

``Tap.finish`` is the one point where a request is over, whatever ended it (an answer, an error, a client that
went away): everything about it is counted there, once, and handed to the telemetry recorder
(``telemetry/recorder.py``) as one tuple appended to its buffer. llama-server's ``timings`` object, which follows
``usage`` in the same answer or event, is kept as it came (a slice of the answer); the telemetry writer reads it
and works out the rates, off the request path.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Final

from athanor.ingress.heads import number_at
from athanor.metrics import Metrics

if TYPE_CHECKING:
    from athanor.telemetry.recorder import Recorder

_monotonic: Final = time.monotonic  # compiled, a C static: ``time.monotonic`` is a module lookup per call

_TOKENS: Final = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens|cache_read_input_tokens|'
                            rb'cache_creation_input_tokens|cached_tokens)"\s*:\s*(\d+)')
# llama-server's own layout of its usage (every answer and final streamed event of this build), read whole from
# where it starts by ``llama_usage``. Any other layout (another runtime, another build, Anthropic's or the Responses
# API's usage) takes the general pattern above.
_USAGE_OPEN: Final = b'"usage":{"completion_tokens":'
_PROMPT: Final = b',"prompt_tokens":'
_TOTAL: Final = b',"total_tokens":'
_CACHED: Final = b',"prompt_tokens_details":{"cached_tokens":'
_NO_CHOICES: Final = re.compile(rb'"choices"\s*:\s*\[\s*\]')
# How each streamed API says its answer is complete: OpenAI's chat and completions, Anthropic's Messages, and
# the Responses API. A client may hang up as soon as it has read one of these.
STREAM_ENDS: Final = (b"data: [DONE]", b"event: message_stop", b"event: response.completed")
# the status a request is counted with when its client went away before the end (llama-swap's)
CLIENT_GONE: Final = 499
# What is kept of an answer from its ``"timings"`` on: the object is cut out of it by the telemetry writer
# (``recorder.timings_of``), off the request path. llama-server's is about 230 bytes.
TIMINGS_BYTES: Final = 1024


def llama_usage(data: bytes, start: int) -> tuple[int, int, int | None, int] | None:
    """(completion, prompt and cached tokens, where the object ends) when llama-server's usage, in its own layout,
    starts at ``start``: ``"usage":{"completion_tokens":C,"prompt_tokens":P,"total_tokens":T}``, with
    ``,"prompt_tokens_details":{"cached_tokens":N}`` before the last brace or not; else None. Read by hand, with no
    regular expression, search or ``int()``: compiled, that is a sixth of their cost, and it runs for every answer."""
    completion, end = _labelled_number(data, start, _USAGE_OPEN)
    if end < 0:
        return None
    prompt, end = _labelled_number(data, end, _PROMPT)
    if end < 0:
        return None
    _, end = _labelled_number(data, end, _TOTAL)
    if end < 0:
        return None
    cached: int | None = None
    if data[end:end + len(_CACHED)] == _CACHED:
        cached, end = _labelled_number(data, end, _CACHED)
        if end < 0 or data[end:end + 1] != b"}":
            return None
        end += 1
    if data[end:end + 1] != b"}":
        return None
    return completion, prompt, cached, end + 1


def _labelled_number(data: bytes, at: int, label: bytes) -> tuple[int, int]:
    """(the number that follows ``label`` at ``data[at:]``, where it ends); the end is -1 when the label or the
    digits are not there."""
    start = at + len(label)
    if data[at:start] != label:
        return 0, -1
    value, end = number_at(data, start)
    return value, end if end > start else -1


def object_end(data: bytes, start: int) -> int:
    """Where the JSON object that opens first after ``start`` ends (braces inside strings aside: usage and
    timings objects hold numbers only). The patterns above then scan that object alone, not the rest of the body."""
    at = data.find(b"{", start)
    if at < 0:
        return start
    depth, at = 1, at + 1
    while depth:
        close = data.find(b"}", at)
        if close < 0:
            return len(data)
        opening = data.find(b"{", at, close)
        if opening >= 0:
            depth, at = depth + 1, opening + 1
        else:
            depth, at = depth - 1, close + 1
    return at


class Tap:
    """What one request tells the metrics: its status and duration (``finish``), time to first token, and the
    usage the runtime reported. A stream whose client did not ask for usage is asked for it anyway
    (``stream_options``), and the usage-only chunk is dropped on the way back (``drop_usage``)."""

    __slots__ = ("_tokens_seen", "arrived", "counts", "drop_usage", "model", "request_counts", "route",
                 "route_counts", "runtime", "skip_blank", "tail", "telemetry", "timings", "ttft")

    def __init__(self, metrics: Metrics, model: str, route: str, arrived: float, telemetry: Recorder | None = None):
        self.model, self.route, self.arrived = model, route, arrived
        self.request_counts = counted = metrics.request_counts
        self.route_counts = counted.counts(model, route)  # what ``finish`` adds to
        self.telemetry = telemetry
        self.runtime = ""  # set once the model's runtime is known (``app._for_model``)
        self.drop_usage = False
        self.counts: dict[bytes, int] = {}
        # llama-server's own ``"timings": {...}``, as it sent them: only telemetry reads them, off the request path
        self.timings: bytes | None = None
        self._tokens_seen: tuple[int, int, int | None] | None = None  # ``_tokens`` of ``counts`` as they are now
        self.ttft: float | None = None  # seconds from arrival to the first streamed byte
        self.tail = b""  # the last bytes of a stream written to the client
        self.skip_blank = False  # a usage-only event was cut and the blank line that ends it has not come yet

    def first_byte(self) -> None:
        self.ttft = _monotonic() - self.arrived
        self.request_counts.first_token(self.model, self.ttft)

    def read_usage(self, data: bytes) -> None:
        """Token counts from a body or SSE event with a ``usage`` object; the last value of each wins (an
        Anthropic stream sends its input count first and its final output count last)."""
        counts = self.counts
        after = 0  # where the timings are looked for from
        # The last one: a runtime puts its usage after the choices, where a generated text that says "usage" is.
        start = data.rfind(b'"usage"')
        if start >= 0:
            self._tokens_seen = None
            llama = llama_usage(data, start)
            if llama is not None:
                completion, prompt, cached, after = llama  # llama-server's timings follow its usage
                counts[b"completion_tokens"], counts[b"prompt_tokens"] = completion, prompt
                if cached is not None:
                    counts[b"cached_tokens"] = cached
            else:
                for key, value in _TOKENS.findall(data, start, object_end(data, start)):
                    counts[key] = int(value)
        start = data.find(b'"timings"', after)
        if start < 0 and after:
            start = data.find(b'"timings"')
        if start >= 0:
            self.timings = data[start:start + TIMINGS_BYTES]  # cut to the object by the telemetry writer

    def usage_lines(self, lines: bytes) -> bytes:
        """SSE lines that mention usage: count it, and cut the usage-only event the client did not ask for, with the
        blank line that ends it, which may come with the next chunk (``skip_blank``)."""
        out = []
        skip_blank = self.skip_blank
        for line in lines.splitlines(keepends=True):
            if skip_blank and not line.strip():
                skip_blank = False
                continue
            skip_blank = False
            if b'"usage"' in line:
                self.read_usage(line)
                if self.drop_usage and _NO_CHOICES.search(line):
                    skip_blank = True
                    continue
            out.append(line)
        self.skip_blank = skip_blank
        return b"".join(out)

    def stream_ended(self) -> bool:
        """Whether the stream's last write carried its end (so a client that hangs up now had all of it)."""
        tail = self.tail
        return bool(tail) and any(end in tail for end in STREAM_ENDS)

    def finish(self, status: int, *, client_gone: bool = False) -> None:
        """The request is over: count it, its duration and the usage seen, exactly once. ``status`` is what the
        client was answered (or was being answered when it went away); ``client_gone``: it went away before the
        end of its answer, counted as 499. The one place a per-request record is taken from: the telemetry
        recorder gets one tuple appended to its buffer (``telemetry/recorder.py``: ``Record``)."""
        total = _monotonic() - self.arrived
        if client_gone:
            status = CLIENT_GONE
        prompt = completion = cached = None
        if self.counts:
            prompt, completion, cached = self._tokens()
            self.route_counts.add(status, total, prompt, completion)
        else:
            self.route_counts.add(status, total)
        if self.telemetry is not None:
            self.telemetry.record((time.time() - total, self.model, self.runtime, self.route, status, prompt,
                                   completion, cached, self.ttft, total, self.timings, client_gone))

    def slot_tokens(self) -> int | None:
        """What this request may have left in the runtime's slot, its prompt and completion as the runtime
        reported them; None when it reported none."""
        if not self.counts:
            return None
        prompt, completion, _ = self._tokens()
        return prompt + completion

    def _tokens(self) -> tuple[int, int, int | None]:
        """(prompt, completion, cached), worked out once for ``slot_tokens`` and ``finish`` both. OpenAI's
        prompt_tokens (and the Responses API's input_tokens) include cached tokens; Anthropic's input_tokens do
        not, so its cache counts are added back."""
        if self._tokens_seen is not None:
            return self._tokens_seen
        counts = self.counts
        prompt = counts.get(b"prompt_tokens")
        if prompt is None:
            prompt = sum(counts.get(k, 0) for k in (b"input_tokens", b"cache_read_input_tokens",
                                                    b"cache_creation_input_tokens"))
        completion = counts.get(b"completion_tokens", counts.get(b"output_tokens", 0))
        seen = self._tokens_seen = (prompt, completion,
                                    counts.get(b"cached_tokens", counts.get(b"cache_read_input_tokens")))
        return seen
