"""Stopping a runtime for good, when its service manager may fail to, and saying how a runtime ended.

A stop can fail: launchctl gives up waiting for a bootout, systemctl times out after 60 s, a signal is refused.
Dropping the handle then would record Standby while the job may still run (launchd's KeepAlive even restarts
it), and nothing could reach it again: preflight refuses every start of the model as "port in use", and
``athanor down`` finds a dead gateway's jobs only through the handles in state.json. So the controller keeps the
handle of a stop that failed, records ``StopFailed``, and retries here, with a bounded backoff: a stop is "stop,
then confirm", never one call assumed to have worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from athanor.managers.base import Handle, ServiceManager

STOP_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # between the attempts: six attempts over about 15 s, plus theirs
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL for a failed runtime
STOP_TIMEOUT_S = 10.0  # ... and for one that is stopped on purpose
HUNG_GRACE_S = 1.0  # ... and for a frozen one, which cannot act on SIGTERM anyway

# (attempt, the error, seconds until the next attempt or None: the last one failed)
AttemptFailed = Callable[[int, Exception, "float | None"], None]


class StopFailed(Exception):
    """Every attempt to stop a job failed; its handle must be kept, since the job may still run."""

    def __init__(self, attempts: int, last: Exception):
        super().__init__(f"{attempts} attempt{'s' if attempts != 1 else ''} failed, the last with: {last}")
        self.attempts = attempts
        self.last = last


async def stop_retrying(
    manager: ServiceManager, handle: Handle, grace: float, *, failed: AttemptFailed,
    delays: tuple[float, ...] = STOP_RETRY_DELAYS_S, hurry: asyncio.Event | None = None,
) -> int | None:
    """``manager.stop(handle, grace)`` until it succeeds; returns the job's exit code if known. After each failure
    ``failed`` is told, then the next attempt waits its delay; once ``hurry`` is set (shutdown) no further attempt
    is made. Raises StopFailed when the attempts run out."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await manager.stop(handle, grace)
        except Exception as exc:  # noqa: BLE001 - any manager's failure (launchctl, systemctl, a signal) is retried
            hurried = hurry is not None and hurry.is_set()
            delay = delays[attempt - 1] if attempt <= len(delays) and not hurried else None
            failed(attempt, exc, delay)
            if delay is None:
                raise StopFailed(attempt, exc) from exc
            await _pause(delay, hurry)


async def _pause(delay: float, hurry: asyncio.Event | None) -> None:
    """Wait ``delay`` seconds before the next attempt; shutdown (``hurry``) cuts it short for one last attempt."""
    if hurry is None:
        await asyncio.sleep(delay)  # a retry interval, not synchronisation
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), delay)


def exit_text(code: int | None) -> str:
    """How a runtime ended, for people: 'killed by SIGKILL' rather than 'exit code -9'."""
    if code is None:
        return "the runtime exited unexpectedly"
    if code < 0:
        return f"the runtime was {ending(code)}"
    return f"the runtime exited unexpectedly with code {code}"


def ending(code: int) -> str:
    """How a process ended, in a few words: 'killed by SIGILL (Illegal instruction, exit code -4)', 'exit code
    1'. A signal's own description says more than its number: SIGILL, for one, is a runtime built for an
    instruction set this CPU does not run."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code} (exit code {code})"
    description = signal.strsignal(-code)
    return f"killed by {name} ({f'{description}, ' if description else ''}exit code {code})"
