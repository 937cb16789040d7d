"""What the controller says happened, in order: the one feed that persistence, metrics, the admin API's SSE stream
and the TUI read.

Every event gets a sequence number, so a client that reconnects asks for what came after the last one it saw
(``since``) and misses nothing the log still holds. Listeners are plain callables run inside ``emit`` (metrics
counting, the state.json writer): they must be quick and must not raise. Streams (``follow``) get their own
bounded queue; one that stops reading is cut off instead of holding memory or the controller back.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from athanor.timestamps import utc_timestamp

Event = dict[str, Any]
Listener = Callable[[Event], None]

KEEP = 500  # events held in memory (and in state.json)
STREAM_BACKLOG = 1000  # events a slow stream may fall behind before it is cut off


class Lagged(Exception):
    """A stream fell too far behind; the client reconnects with ``since`` to catch up."""


class EventLog:
    def __init__(self, keep: int = KEEP) -> None:
        self._events: deque[Event] = deque(maxlen=keep)
        self._seq = itertools.count(int(time.time() * 1000) << 10)  # grows across daemon restarts too
        self._listeners: list[Listener] = []
        self._streams: set[asyncio.Queue[Event | None]] = set()

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, name: str, type_: str, reason: str, message: str, **extra: Any) -> Event:
        """Record one event. ``kind``: Model, Store, Gateway; ``type_``: Normal or Warning; ``reason``: one
        CamelCase word (Ready, Evicted, Crashed...); ``extra``: fields for machines (phase, seconds...)."""
        event: Event = {"seq": next(self._seq), "time": utc_timestamp(millis=True), "kind": kind, "name": name,
                        "type": type_, "reason": reason, "message": message, **extra}
        self._events.append(event)
        for listener in self._listeners:
            listener(event)
        for queue in list(self._streams):
            if queue.qsize() >= STREAM_BACKLOG:
                self._streams.discard(queue)
                queue.put_nowait(None)  # the reader learns it lagged
            else:
                queue.put_nowait(event)
        return event

    def since(self, seq: int | None = None) -> list[Event]:
        """Held events after ``seq`` (all of them for None)."""
        if seq is None:
            return list(self._events)
        return [e for e in self._events if e["seq"] > seq]

    async def follow(self, since: int | None = None) -> AsyncIterator[Event]:
        """Held events after ``since``, then each new one as it happens, until the caller stops reading.
        Raises Lagged when the caller fell more than STREAM_BACKLOG events behind."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._streams.add(queue)  # before the backlog is read: nothing can fall between the two
        try:
            last = since
            for event in self.since(since):
                last = event["seq"]
                yield event
            while True:
                event = await queue.get()
                if event is None:
                    raise Lagged(f"fell more than {STREAM_BACKLOG} events behind")
                if last is not None and event["seq"] <= last:
                    continue  # already sent from the backlog
                yield event
        finally:
            self._streams.discard(queue)
