"""What a failure counts for: the crash window, the restart backoff, and when a model is left ``Failed``.

A start that fails, a runtime that dies and one that stops answering each count one failure against the
instance (the controller makes sure it is once per incarnation). The next request restarts it after a backoff
that doubles with each recent failure; ``CRASH_LIMIT`` failures within ``CRASH_WINDOW_S`` leave it ``Failed``
until ``athanor restart``. A stop that failed is recorded the same way but is not the runtime's failure, so it
does not count; a refused start (preflight, memory) is neither.
"""

from __future__ import annotations

import time
from typing import Any

from athanor.controller.instance import Instance, Phase
from athanor.timestamps import utc_timestamp

CRASH_WINDOW_S = 120.0
CRASH_LIMIT = 3


def count_failure(inst: Instance, kind: str, reason: str, exit_code: int | None = None) -> dict[str, Any]:
    """Count one failure of ``kind`` (Crashed, Hung, Unhealthy, StartFailed, RestoreFailed) now and record it as
    the instance's last; returns that record, which its clean-up completes (exit code, log tail)."""
    now = time.time()
    inst.failures = [t for t in inst.failures if now - t < CRASH_WINDOW_S] + [now]
    inst.last_failure = _failure(kind, reason, now, exit_code)
    return inst.last_failure


def record_stop_failure(inst: Instance, message: str) -> dict[str, Any]:
    """Record a stop that failed as the last failure, without counting it towards a crash loop."""
    inst.last_failure = _failure("StopFailed", message, time.time(), None)
    return inst.last_failure


def refusal(kind: str, reason: str) -> dict[str, Any]:
    """The record of a start refused before anything was stopped (StartRefused, InsufficientMemory)."""
    return {"reason": kind, "message": reason, "time": utc_timestamp(time.time())}


def backoff(inst: Instance) -> float:
    """Seconds before a failed instance may start again: 0.5 s, 1 s, 2 s ... (at most 8 s) after its last failure."""
    if inst.phase is not Phase.FAILED or not inst.failures:
        return 0.0
    delay = min(0.5 * 2 ** (len(inst.failures) - 1), 8.0)
    return max(0.0, inst.failures[-1] + delay - time.time())


def crash_loop(inst: Instance) -> str | None:
    """Why a failed instance is not restarted by requests any more (None: it may be)."""
    if inst.phase is not Phase.FAILED:
        return None
    now = time.time()
    if len([t for t in inst.failures if now - t < CRASH_WINDOW_S]) < CRASH_LIMIT:
        return None
    return (f"model {inst.name!r} failed {CRASH_LIMIT} times in {CRASH_WINDOW_S:.0f} s: {inst.message} "
            f"(athanor restart {inst.name} retries)")


def unstoppable(inst: Instance) -> str | None:
    """A failed runtime whose stop and its retries all failed may still hold the model's port and memory."""
    if inst.phase is not Phase.FAILED or inst.handle is None or inst.cleanup_task is None \
            or not inst.cleanup_task.done():
        return None
    failure = (inst.last_failure or {}).get("message", inst.message)
    return f"model {inst.name!r}: its runtime could not be stopped: {failure} ('athanor stop {inst.name}' retries)"


def _failure(kind: str, message: str, at: float, exit_code: int | None) -> dict[str, Any]:
    return {"reason": kind, "message": message, "time": utc_timestamp(at), "exitCode": exit_code, "logTail": []}
