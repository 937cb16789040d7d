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

from typing import Any, Final, TypeVar

HEAD_END: Final = b"\r\n\r\n"
MAX_REMEMBERED: Final = 64  # distinct heads per memo: a few clients, each with its own (their user agents differ)
_MAX_DIGITS: Final = 15
# How Content-Length is spelled in practice: aiohttp, cpp-httplib and Python's http.server send the first, httpx
# (the openai SDK) and uvicorn the second. A head that spells it otherwise is parsed every time.
_LENGTH_LINE: Final = b"\r\nContent-Length: "
_LENGTH_LINE_LOWER: Final = b"\r\ncontent-length: "

T = TypeVar("T")


def length_key(data: bytes, end: int) -> tuple[bytes, bytes, int] | None:
    """(the head ``data[:end]`` with its Content-Length value cut out, the value as sent, the value) when the head
    can be remembered by that key; None otherwise. ``end``: where the head's blank line starts."""
    found = _length_at(data, end)
    if found is None:
        return None
    start, stop, length = found
    return data[:start] + data[stop:end], data[start:stop], length


def _length_at(data: bytes, end: int) -> tuple[int, int, int] | None:
    """(where the Content-Length value of the head ``data[:end]`` starts, where it ends, the value) when it is plain
    digits, else None. (Written for speed: searches without bounds, whose parsing costs more than the search, and
    the value read by ``number_at``, not by a search for its line's end, ``isdigit`` and ``int``.)"""
    at = data.find(_LENGTH_LINE)
    if not 0 <= at < end:
        at = data.find(_LENGTH_LINE_LOWER)
        if not 0 <= at < end:
            return None
    start = at + 18  # len(_LENGTH_LINE)
    length, stop = number_at(data, start)
    if stop == start or stop - start > _MAX_DIGITS or stop > end or data[stop] != 13:  # digits, then its "\r"
        return None
    return start, stop, length


def number_at(data: bytes, at: int) -> tuple[int, int]:
    """(the value of the ASCII digits at ``data[at:]``, where they end); (0, at) when there are none. Compiled, a
    loop over a few bytes costs a twentieth of a method call of ``bytes`` (this Python's take their arguments as a
    tuple and parse it) and of ``int()``."""
    value = 0
    size = len(data)
    while at < size:
        digit = data[at] - 48
        if not 0 <= digit <= 9:
            break
        value = value * 10 + digit
        at += 1
    return value, at


class HeadMemo(dict[bytes, T]):
    """What one side made of the heads it parsed, by ``length_key``'s key (``get`` is the dict's). Bounded: when
    full, it starts over (a client that sends a different head each time gains nothing, and costs one lookup per
    request)."""

    def remember(self, key: bytes, parsed: T) -> None:
        if len(self) >= MAX_REMEMBERED:
            self.clear()
        self[key] = parsed


class KnownHeads:
    """A read that starts a message, looked up by its head before llhttp sees it, and what llhttp's body callbacks
    (``on_body``, ``on_message_complete``) would see of a message whose head was known; for the protocol that mixes
    it in (the front door's connection, the pool's), which takes a known head in ``known_head``."""

    _left = 0  # the body's bytes still to come (``body_rest`` takes them first)
    _learning: tuple[bytes, bytes, int] | None = None  # the key of the head llhttp parses now, to remember it by
    # The head this connection's last message had, found in the memo: (its bytes up to the length's value, its bytes
    # from the value's end through the blank line, its key, what its parse made). See ``head_looked_up``.
    _last: tuple[bytes, bytes, bytes, Any] | None = None

    def known_head(self, known: Any, found: tuple[bytes, bytes, int], data: bytes, start: int) -> bytes:
        """What the head's parse made, remembered (``found``: ``length_key``'s; the body begins at ``start``).
        Returns what follows the message in ``data``, for llhttp (``body_from``'s)."""
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        raise NotImplementedError

    def on_message_complete(self) -> None:
        raise NotImplementedError

    def head_looked_up(self, memo: HeadMemo[Any], data: bytes) -> bytes:
        """A read that starts a message: taken here when its head is in ``memo``, and what follows the message is
        returned for llhttp; else all of ``data`` is, with the head's key kept (``_learning``) for the parse's
        end to remember it by.

        A connection's messages mostly repeat its last head, so that one is tried first, by comparing bytes: the
        same bytes before the length's value, digits, then the same bytes through the blank line. That is exactly
        what the search, ``length_key`` and the memo would find (the head's first blank line and first length
        line are where they were in the last head, as no digit can make or break either), for a fifth of the
        cost. A parse is a function of the head's bytes alone, so the last one stays right whatever the memo
        does meanwhile."""
        last = self._last
        if last is not None and data.startswith(last[0]):
            start = len(last[0])
            length, stop = number_at(data, start)
            then = last[1]
            end = stop + len(then)
            if start < stop <= start + _MAX_DIGITS and data[stop:end] == then:
                return self.known_head(last[3], (last[2], data[start:stop], length), data, end)
        end = data.find(HEAD_END)
        at = _length_at(data, end) if end > 0 else None
        if at is None:
            return data
        start, stop, length = at
        key = data[:start] + data[stop:end]
        found = (key, data[start:stop], length)
        known = memo.get(key)
        if known is None:
            self._learning = found
            return data
        end += len(HEAD_END)
        self._last = (data[:start], data[stop:end], key, known)
        return self.known_head(known, found, data, end)

    def body_from(self, data: bytes, start: int, length: int) -> bytes:
        """The body of ``length`` bytes from ``data[start:]`` on, as much of it as came; returns what follows the
        message in ``data``, for llhttp (pipelined messages)."""
        end = start + length
        if len(data) < end:
            if len(data) > start:
                self.on_body(data[start:])
            self._left = end - len(data)
            return b""
        if length:
            self.on_body(data[start:end])
        self.on_message_complete()
        return data[end:]

    def body_rest(self, data: bytes) -> bytes:
        """More of a body ``body_from`` began; returns what follows the message, for llhttp."""
        left, self._left = self._left, 0
        return self.body_from(data, 0, left)


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
