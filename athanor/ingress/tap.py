"""What one proxied request tells the metrics beyond its status: time to first token and the tokens used.

Usage is read where the runtimes put it, cheaply: a regular expression from the ``"usage"`` key on, over bytes,
never a JSON parse of the answer. A stream whose client did not ask for usage is asked for it anyway (the
ingress adds ``stream_options.include_usage``), and the usage-only event is cut from what the client gets.
"""

from __future__ import annotations

import re
import time

from athanor.metrics import Metrics

# Routes whose streams can carry a usage chunk when asked for one (stream_options.include_usage).
USAGE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
_TOKENS = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens|cache_read_input_tokens|'
                     rb'cache_creation_input_tokens)"\s*:\s*(\d+)')
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class Tap:
    """What one request tells the metrics besides its status: time to first token, and the usage the runtime
    reported. A stream whose client did not ask for usage is asked for it anyway (``stream_options``), and the
    usage-only chunk is dropped on the way back (``drop_usage``)."""

    __slots__ = ("arrived", "counts", "drop_usage", "metrics", "model")

    def __init__(self, metrics: Metrics, model: str, arrived: float):
        self.metrics, self.model, self.arrived = metrics, model, arrived
        self.drop_usage = False
        self.counts: dict[bytes, int] = {}

    def first_byte(self) -> None:
        self.metrics.first_token(self.model, time.monotonic() - self.arrived)

    def read_usage(self, data: bytes) -> None:
        """Token counts from a body or SSE event with a ``usage`` object; the last value of each wins (an
        Anthropic stream sends its input count first and its final output count last)."""
        for key, value in _TOKENS.findall(data[data.find(b'"usage"'):]):
            self.counts[key] = int(value)

    def usage_lines(self, lines: bytes) -> bytes:
        """SSE lines that mention usage: count it, and cut the usage-only event the client did not ask for."""
        out = []
        skip_blank = False
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
        return b"".join(out)

    def done(self) -> None:
        """Count the usage seen. OpenAI's prompt_tokens (and the Responses API's input_tokens) include cached
        tokens; Anthropic's input_tokens do not, so its cache counts are added back."""
        counts = self.counts
        if not counts:
            return
        prompt = counts.get(b"prompt_tokens")
        if prompt is None:
            prompt = sum(counts.get(k, 0) for k in (b"input_tokens", b"cache_read_input_tokens",
                                                    b"cache_creation_input_tokens"))
        completion = counts.get(b"completion_tokens", counts.get(b"output_tokens", 0))
        self.metrics.usage(self.model, prompt, completion)
