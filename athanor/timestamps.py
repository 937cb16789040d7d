"""Times as athanor writes them: UTC, ISO 8601, ``Z`` for the zone (``2026-11-25T05:00:00Z``).

One writer for every stored time (a model's ``creationTimestamp``, a handle's ``started_at``, the daemon's
``startedAt``, an event's ``time``), so they all sort as text and read back with one parser.
"""

from __future__ import annotations

from datetime import datetime, timezone

UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # what ``utc_timestamp()`` writes, for ``strptime`` when a stored time is checked


def utc_timestamp(at: float | None = None, *, millis: bool = False) -> str:
    """``at`` (seconds since the epoch; None: now) in UTC, to the second, or to the millisecond for events, which
    can come several a second and are ordered by them."""
    moment = datetime.now(timezone.utc) if at is None else datetime.fromtimestamp(at, timezone.utc)
    return moment.isoformat(timespec="milliseconds" if millis else "seconds").replace("+00:00", "Z")
