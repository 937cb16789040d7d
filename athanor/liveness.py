"""Is the gateway running? The CLI asks before it shows a phase (a record of a dead daemon says nothing about now).

Kept apart from ``daemon.py`` so that ``get`` and ``describe`` answer without importing the server.
"""

from __future__ import annotations

from typing import Any

from athanor.managers.base import same_start
from athanor.store import Store


def daemon_record(store: Store) -> dict[str, Any] | None:
    """The running daemon's record, or None if there is none (a stale record of a dead daemon counts as none, and so
    does a zombie: a daemon killed but not yet reaped by its parent serves nothing and holds no lock)."""
    import psutil

    record = store.state.load().get("daemon")
    if not record:
        return None
    try:
        proc = psutil.Process(record["pid"])
        if not same_start(record.get("createTime", 0), proc.create_time()):
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.Error, KeyError, TypeError):
        return None
    return record
