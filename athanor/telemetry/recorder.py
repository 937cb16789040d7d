"""The daemon's side of telemetry: the request path appends, a task writes.

``Recorder.record`` is ``deque.append``: what ``Tap.finish`` pays per request is building one tuple and appending
it. Every ``FLUSH_S`` the buffer is swapped out on the event loop and written in one transaction in a worker
thread (``asyncio.to_thread``), with the Gateway's retention applied in the same transaction. A read (the admin
API) flushes first, so a client sees its own requests. The buffer is bounded (``MAX_PENDING``): a disk that
stalls for long drops the oldest records rather than growing the daemon.

The token rates are worked out at write time, off the request path (``rates``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from athanor.ingress.tap import object_end
from athanor.quantities import parse_duration
from athanor.telemetry import db

log = logging.getLogger("athanor.telemetry")

FLUSH_S = 1.0
MAX_PENDING = 100_000

# A runtime's ``"timings": {...}`` object, kept raw by ``Tap``, is read here, off the request path: llama-server's
# own layout (every answer and final streamed event of this build) in one match, any other by the general pattern.
_LLAMA_TIMINGS = re.compile(rb'"timings":\{"cache_n":(\d+),"prompt_n":(\d+),"prompt_ms":[^,]*,"prompt_per_token_ms":'
                            rb'[^,]*,"prompt_per_second":([^,]*),"predicted_n":(\d+),"predicted_ms":[^,]*,'
                            rb'"predicted_per_token_ms":[^,]*,"predicted_per_second":([^,}]*)\}')
_TIMINGS = re.compile(rb'"(prompt_n|prompt_per_second|predicted_n|predicted_per_second|cache_n)"\s*:\s*([0-9.eE+-]+)')
# The timings stored, in the order of ``_LLAMA_TIMINGS``'s groups.
TIMING_KEYS = (b"cache_n", b"prompt_n", b"prompt_per_second", b"predicted_n", b"predicted_per_second")

# What Tap.finish appends: (arrived at, epoch s; model; runtime; route; status (499: client gone); prompt,
# completion, cached tokens (None: not reported); TTFT s (None: not streamed); total s; the runtime's own
# timings object as it sent it (``timings_of``), or None; client gone)
Record = tuple[float, str, str, str, int, int | None, int | None, int | None, float | None, float, bytes | None,
               bool]
_NO_TIMINGS = (None,) * 5
T = TypeVar("T")


def retention_of(gateway: dict[str, Any]) -> db.Retention:
    """The Gateway spec's ``telemetry.retention`` (``maxRecords``, ``maxAge``: a duration, or ``never``)."""
    retention = (gateway.get("telemetry") or {}).get("retention") or {}
    max_age = retention.get("maxAge")
    return db.Retention(retention.get("maxRecords"), parse_duration(max_age) if max_age else None)


def rates(prompt: int | None, completion: int | None, ttft: float | None, total: float,
          runtime_decode: float | None = None, runtime_prefill: float | None = None
          ) -> tuple[float | None, float | None]:
    """(decode, prefill) tokens per second of one request.

    The runtime's own figures come first: llama-server's ``timings`` (``predicted_per_second`` and
    ``prompt_per_second``, given as ``runtime_decode`` and ``runtime_prefill``) time the work itself, without
    queueing, loading or the gateway. Otherwise, for a streamed answer: decode = completion tokens / (total - TTFT),
    the pace after the first token (only with two tokens or more, the first one being in the TTFT); prefill =
    prompt tokens / TTFT, which includes any wait for a slot or a load, so it is a lower bound. A whole (not
    streamed) answer without ``timings`` has neither. A runtime's rate that is not a positive number (llama-server
    says 0 when its timer read 0 ms) measured nothing: it counts as absent, never as a request that ran at 0
    tokens/s.
    """
    decode = _measured(runtime_decode)
    if decode is None and completion is not None and completion >= 2 and ttft is not None and total > ttft:
        decode = completion / (total - ttft)
    prefill = _measured(runtime_prefill)
    if prefill is None and prompt and ttft:
        prefill = prompt / ttft
    return decode, prefill


def _measured(rate: float | None) -> float | None:
    return rate if rate is not None and 0 < rate < math.inf else None


def timings_of(raw: bytes | None) -> tuple[bytes | None, ...] | None:
    """The values of ``TIMING_KEYS``, in that order, as the runtime wrote them (None: not given), from the
    ``"timings"`` object at the start of what ``Tap`` kept (``TIMINGS_BYTES`` of the answer from there); None when
    there is none."""
    if not raw:
        return None
    llama = _LLAMA_TIMINGS.match(raw)
    if llama is not None:
        return llama.groups()
    found = dict(_TIMINGS.findall(raw, 0, object_end(raw, 0)))
    return tuple([found.get(key) for key in TIMING_KEYS]) if found else None


def row_of(record: Record) -> db.Values:
    """The row to store, as a plain tuple in ``db.COLUMNS`` order. This runs for every request: a tuple is made
    faster than a ``db.Row``, and sqlite3 binds an int faster than a bool (a bool is offered to its adapters
    first). Of the runtime's timings, only what is stored is parsed."""
    arrived, model, runtime, route, status, prompt, completion, cached, ttft, total, raw, gone = record
    cache_n, _, prefill_rate, predicted_n, decode_rate = timings_of(raw) or _NO_TIMINGS
    if cached is None and cache_n is not None:
        cached = _count(cache_n)
    if completion is None and predicted_n is not None:
        completion = _count(predicted_n)
    decode, prefill = rates(prompt, completion, ttft, total, _number(decode_rate), _number(prefill_rate))
    return arrived, model, runtime, route, status, prompt, completion, cached, ttft, total, decode, prefill, int(gone)


def _number(raw: bytes | None) -> float | None:
    """A figure as the runtime wrote it; None when it gave none or not a number."""
    if raw is None:
        return None
    try:  # not a context manager: this runs for every request, in the writer's thread
        return float(raw)
    except ValueError:
        return None


def _count(raw: bytes) -> int | None:
    number = _number(raw)
    return int(number) if number is not None and math.isfinite(number) else None


class Recorder:
    """The daemon's telemetry: ``record`` on the request path, ``run`` as a task, ``flush``/``read`` for the
    admin API, ``close`` at shutdown. ``retention`` is asked on the event loop before each write (it follows the
    Gateway spec as it changes)."""

    def __init__(self, path: Path, retention: Callable[[], db.Retention], interval: float = FLUSH_S):
        self.path = path
        self.retention = retention
        self.interval = interval
        self.pending: deque[Record] = deque(maxlen=MAX_PENDING)
        self.record = self.pending.append  # the request path's whole cost: one append
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._working: asyncio.Future[Any] | None = None  # what a worker thread is doing with the connection

    async def open(self) -> None:
        """Open (or create) the file. One that cannot be opened is logged and telemetry is off until the next
        start: it never keeps the gateway from serving."""
        try:
            self._conn = await asyncio.to_thread(db.connect, self.path, create=True)
        except (sqlite3.Error, OSError) as exc:
            log.warning("telemetry is off: cannot open %s: %s", self.path, exc)

    async def run(self) -> None:
        """Write the buffer every ``interval`` seconds until cancelled. A failed write is logged and its batch
        dropped: telemetry never stops the gateway."""
        while True:
            await asyncio.sleep(self.interval)  # the write cadence: at most this much is lost to a kill -9
            await self.flush()

    async def flush(self) -> int:
        """Write what is pending now, in one transaction; how many records."""
        async with self._lock:
            if self._conn is None:
                self.pending.clear()
            if not self.pending:
                return 0
            batch = list(self.pending)  # taken on the loop, where appends happen: nothing slips between
            self.pending.clear()
            try:
                await self._in_thread(self._write, self._conn, batch, self.retention())
            except (sqlite3.Error, OSError) as exc:
                log.warning("telemetry: %d records not written to %s: %s", len(batch), self.path, exc)
                return 0
            return len(batch)

    async def _in_thread(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in a worker thread, under the lock. Shielded: a caller cancelled meanwhile (a flush at
        shutdown, an admin request whose client left) lets the thread finish, and the next use of the connection
        waits for it (``_settled``), so two threads never use it at once."""
        await self._settled()
        self._working = asyncio.ensure_future(asyncio.to_thread(work, *args))
        return await asyncio.shield(self._working)

    async def _settled(self) -> None:
        if self._working is not None and not self._working.done():
            await asyncio.wait([self._working])

    @staticmethod
    def _write(conn: sqlite3.Connection, batch: list[Record], retention: db.Retention) -> None:
        db.write(conn, [row_of(r) for r in batch], retention, time.time())

    async def read(self, query: Callable[..., T], *args: Any) -> T:
        """``query(conn, *args)`` (``db.records``, ``db.compare``, ``db.clear``) after a flush, in a worker thread,
        on the writer's connection (serialised with writes)."""
        await self.flush()
        async with self._lock:
            return await self._in_thread(query, self._conn, *args)

    async def close(self) -> None:
        """At shutdown, after the ingress stopped: write the rest and close the file."""
        await self.flush()
        async with self._lock:
            await self._settled()
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await asyncio.to_thread(conn.close)
