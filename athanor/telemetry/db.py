"""The telemetry file, ``$ATHANOR_HOME/telemetry.db``: one row per finished request, in SQLite.

Why SQLite in WAL mode: a batch is one transaction, so a daemon killed with ``kill -9`` loses at most the batch it
had not yet committed, never the file (a committed transaction is in the WAL, which the next opener replays);
and readers (the CLI with the daemon down, the admin API's reads) never block the writer. ``synchronous=NORMAL``
is enough for that: it can lose the last transactions on a power cut, not on a crash of the process.

Rows are written by the daemon only (``recorder.py``); the CLI reads the file directly when no daemon runs, and
clears it directly then. Every function here takes an open connection and runs in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sqlite3
import statistics
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from athanor.errors import InvalidValueError
from athanor.timestamps import utc_timestamp

FILENAME = "telemetry.db"
DEFAULT_LIMIT = 100  # records ``ls`` shows
DEFAULT_LAST = 100  # records per model ``compare`` looks at
BUSY_TIMEOUT_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    model TEXT NOT NULL,
    runtime TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cached_tokens INTEGER,
    ttft REAL,
    total REAL NOT NULL,
    decode_tps REAL,
    prefill_tps REAL,
    client_gone INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_model ON requests (model, id);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
"""
COLUMNS = ("time", "model", "runtime", "route", "status", "prompt_tokens", "completion_tokens", "cached_tokens",
           "ttft", "total", "decode_tps", "prefill_tps", "client_gone")
# The columns a request may leave empty. A row's ``None`` is bound as ``ABSENT`` and turned back into NULL by the
# statement (``NULLIF``): no count, time or rate is negative, and sqlite3 binds an int directly where a None goes
# through its adapter registry first, which cost half as much as the insert itself.
NULLABLE = frozenset({"prompt_tokens", "completion_tokens", "cached_tokens", "ttft", "decode_tps", "prefill_tps"})
ABSENT = -1
ROWS_PER_INSERT = 50  # rows per INSERT statement (50 x 13 values, within SQLite's oldest limit of 999)
_ONE_ROW = f"({', '.join(f'NULLIF(?, {ABSENT})' if c in NULLABLE else '?' for c in COLUMNS)})"
_SINCE_AGO = re.compile(r"^([0-9]+(ms|s|m|h|d))+$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Row(NamedTuple):
    """One request as stored (``COLUMNS``); ``time`` is when it arrived, in seconds since the epoch."""

    time: float
    model: str
    runtime: str
    route: str
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    ttft: float | None
    total: float
    decode_tps: float | None
    prefill_tps: float | None
    client_gone: bool


# A row's values in ``COLUMNS`` order, as written (a ``Row`` is one too).
Values = tuple[float, str, str, str, int, int | None, int | None, int | None, float | None, float, float | None,
               float | None, int]


class Retention(NamedTuple):
    """How much is kept: at most ``max_records`` rows, none older than ``max_age`` seconds (None: no bound)."""

    max_records: int | None
    max_age: float | None


def path_in(home: Path) -> Path:
    return home / FILENAME


def connect(path: Path, *, create: bool) -> sqlite3.Connection | None:
    """The file, opened in WAL mode with the schema in place; None when it does not exist and ``create`` is
    false (a reader never creates it). A new file is created 0600: prompts are not stored, but model names and
    usage are the user's own. ``check_same_thread=False``: each call comes from some worker thread, one at a
    time (the recorder serialises them)."""
    if not path.exists():
        if not create:
            return None
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def write(conn: sqlite3.Connection, rows: Sequence[Values], retention: Retention, now: float) -> None:
    """One batch in one transaction, then whatever the retention no longer allows is deleted in the same one.

    ``ROWS_PER_INSERT`` rows go in each statement: a busy gateway writes a couple of thousand rows a second, and
    one statement per row paid sqlite3's per-statement work (and a round trip of the GIL) for each of them."""
    with conn:
        for start in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[start:start + ROWS_PER_INSERT]
            conn.execute(_insert(len(chunk)), [ABSENT if value is None else value for row in chunk for value in row])
        trim(conn, retention, now)


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def _insert(rows: int) -> str:
    return f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES {', '.join([_ONE_ROW] * rows)}"


def trim(conn: sqlite3.Connection, retention: Retention, now: float) -> None:
    if retention.max_age is not None:
        conn.execute("DELETE FROM requests WHERE time < ?", (now - retention.max_age,))
    if retention.max_records is not None:
        # Ids are given in order and rows go from the oldest end (or all at once), so the newest ``max_records``
        # are those within that many of the last id: found through the primary key, without counting the table
        # on every batch. (A gap an age trim leaves can only make it keep fewer.)
        conn.execute("DELETE FROM requests WHERE id <= (SELECT max(id) FROM requests) - ?", (retention.max_records,))


def clear(conn: sqlite3.Connection | None) -> int:
    """Delete every record; how many there were."""
    if conn is None:
        return 0
    with conn:
        return conn.execute("DELETE FROM requests").rowcount


def parse_since(text: str, now: float | None = None) -> float:
    """Seconds since the epoch from ``since``: a span back from now (``90s``, ``30m``, ``2h``, ``7d``) or a UTC
    time (``2026-11-25T05:00:00Z``, as athanor writes times)."""
    now = time.time() if now is None else now
    if _SINCE_AGO.match(text):
        return now - sum(int(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d)", text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidValueError(f"since: {text!r} is neither a span such as 30m, 2h or 7d nor a time such as "
                                "2026-11-25T05:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def records(conn: sqlite3.Connection | None, model: str | None = None, since: float | None = None,
            limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """Records as the admin API serves them, newest first."""
    if conn is None:
        return []
    where, args = [], []
    if model is not None:
        where.append("model = ?")
        args.append(model)
    if since is not None:
        where.append("time >= ?")
        args.append(since)
    sql = f"SELECT {', '.join(COLUMNS)} FROM requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    return [record_view(Row(*r)) for r in conn.execute(sql, (*args, limit))]


def record_view(row: Row) -> dict[str, Any]:
    return {"time": utc_timestamp(row.time, millis=True), "model": row.model, "runtime": row.runtime,
            "route": row.route, "status": row.status, "promptTokens": row.prompt_tokens,
            "completionTokens": row.completion_tokens, "cachedTokens": row.cached_tokens,
            "ttftSeconds": row.ttft, "totalSeconds": row.total, "decodeTokensPerSecond": row.decode_tps,
            "prefillTokensPerSecond": row.prefill_tps, "clientGone": bool(row.client_gone)}


def compare(conn: sqlite3.Connection | None, models: Sequence[str], last: int = DEFAULT_LAST) -> list[dict[str, Any]]:
    """Each model over its last ``last`` requests, in the order asked. Errors are answers of 400 and up except
    499 (the client went away: counted as ``clientGone``). TTFT percentiles are nearest-rank over the streamed
    requests (a whole answer has no first token to time); the token rates are medians of the per-request figures
    (``recorder.rates``), so one request that waited for a load does not drag a model's figure down."""
    out = []
    for model in models:
        rows = [] if conn is None else [Row(*r) for r in conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM requests WHERE model = ? ORDER BY id DESC LIMIT ?", (model, last))]
        ttfts = sorted(r.ttft for r in rows if r.ttft is not None)
        out.append({
            "model": model,
            "requests": len(rows),
            "errors": sum(1 for r in rows if r.status >= 400 and r.status != 499),
            "clientGone": sum(1 for r in rows if r.client_gone),
            "ttftP50": percentile(ttfts, 50),
            "ttftP95": percentile(ttfts, 95),
            "decodeTokensPerSecond": _median(r.decode_tps for r in rows),
            "prefillTokensPerSecond": _median(r.prefill_tps for r in rows),
            "promptTokens": sum(r.prompt_tokens or 0 for r in rows),
            "completionTokens": sum(r.completion_tokens or 0 for r in rows),
        })
    return out


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile of sorted values: the smallest value with at least q% of them at or below."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
