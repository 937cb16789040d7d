"""Heads parsed once: a client sends the same head with every request, and a runtime with every answer, but for the
body's length.

llhttp (``httptools``) calls back into Python for each header line, and the front door and the pool then read every
line again. So a head llhttp accepted is remembered by its bytes with the Content-Length value cut out, with what
the callbacks made of it, and the next head with the same bytes is not parsed again: on the two hops of a small
proxied request that is a tenth of the gateway's instructions (``benchmarks/request_path.py --callgrind``: 225k to
201k per request).

Why that answers as llhttp would:
- llhttp is deterministic: the same bytes parse the same way. The length's value is the one part that may differ,
  and it is checked here to be what llhttp accepts of it (digits, at most 15 of them, far from its overflow).
- Only heads framed by exactly one Content-Length are remembered (no Transfer-Encoding, no Expect, no upgrade:
  the callers check what they parsed), so a head that matches one remembered has exactly one too.
- A remembered head is used only for a message that starts a read, where the parser would be starting a new
  message; anything else (a head split across reads, a new head, the messages pipelined after it) goes to llhttp.
"""

from __future__ import annotations

from typing import TypeVar

HEAD_END = b"\r\n\r\n"
MAX_REMEMBERED = 64  # distinct heads per memo: a few clients, each with its own (their user agents differ)
_MAX_DIGITS = 15
# How Content-Length is spelled in practice: aiohttp, cpp-httplib and Python's http.server send the first, httpx
# (the openai SDK) and uvicorn the second. A head that spells it otherwise is parsed every time.
_LENGTH_LINE, _LENGTH_LINE_LOWER = b"\r\nContent-Length: ", b"\r\ncontent-length: "

T = TypeVar("T")


def length_key(data: bytes, end: int) -> tuple[bytes, bytes, int] | None:
    """(the head ``data[:end]`` with its Content-Length value cut out, the value as sent, the value) when the head
    can be remembered by that key; None otherwise. ``end``: where the head's blank line starts. (It runs twice per
    proxied request, so it is written for speed: searches without bounds, whose parsing costs more than the search.)"""
    at = data.find(_LENGTH_LINE)
    if not 0 <= at < end:
        at = data.find(_LENGTH_LINE_LOWER)
        if not 0 <= at < end:
            return None
    start = at + 18  # len(_LENGTH_LINE)
    stop = data.find(b"\r", start)  # the line's end, at ``end`` at the latest
    value = data[start:stop]
    if len(value) > _MAX_DIGITS or not value.isdigit():
        return None
    return data[:start] + data[stop:end], value, int(value)


class HeadMemo(dict[bytes, T]):
    """What one side made of the heads it parsed, by ``length_key``'s key (``get`` is the dict's). Bounded: when
    full, it starts over (a client that sends a different head each time gains nothing, and costs one lookup per
    request)."""

    def remember(self, key: bytes, parsed: T) -> None:
        if len(self) >= MAX_REMEMBERED:
            self.clear()
        self[key] = parsed


def only_length(headers: list[tuple[bytes, bytes]], value: bytes, unless: frozenset[bytes]) -> int | None:
    """Where the one Content-Length header is among ``headers`` (raw, as parsed), when there is exactly one and its
    value is ``value``, and no header named in ``unless`` (lower-case) is there; else None: the head is not
    remembered."""
    found = None
    for i, (name, raw) in enumerate(headers):
        lower = name.lower()
        if lower == b"content-length":
            if found is not None or raw != value:
                return None
            found = i
        elif lower in unless:
            return None
    return found
