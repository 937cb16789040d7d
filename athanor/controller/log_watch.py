"""Hearing a starting runtime write to its log, so that its readiness is probed at once rather than at the next poll.

A runtime says it is ready in its log as it becomes ready (llama-server's ``listening on`` line comes a fraction
of a millisecond before its ``/health`` answers 200). Probing only on a timer leaves half a poll interval on
every swap; probing on every write of the log notices readiness within one probe of it. The log is a file the
service manager appends to (never a pipe: the runtime outlives the daemon), so the kernel's file notifications are
the way to hear it: inotify on Linux (through libc: the standard library has no binding), kqueue on macOS and the
BSDs. Where neither is available, or the file cannot be watched, ``watch_log`` gives None and readiness is polled
as before: the watch only ever adds probes, it never decides readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import sys
from collections.abc import Callable
from pathlib import Path

from athanor.controller import inotify

log = logging.getLogger("athanor.controller")


class LogWatch:
    """Sets ``written`` each time the watched file grows (a reader on the event loop); ``close`` when done."""

    def __init__(self, fd: int, drain: Callable[[], object], release: Callable[[], None]):
        """``fd``: readable while notifications wait; ``drain``: reads them; ``release``: closes what was opened."""
        self.written = asyncio.Event()
        self._fd, self._drain, self._release = fd, drain, release
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        with contextlib.suppress(OSError):
            self._drain()
        self.written.set()

    def close(self) -> None:
        """Stop watching. The descriptors are closed in a worker thread: closing an inotify instance can wait for
        the kernel's grace period (up to 16 ms measured here), which a swap must not wait for."""
        self._loop.remove_reader(self._fd)
        try:
            self._loop.run_in_executor(None, self._release)
        except RuntimeError:  # the loop is shutting down its executor: nothing waits for a swap any more
            self._release()


def watch_log(path: str | Path) -> LogWatch | None:
    """A watch on the file at ``path`` (which must exist), or None where it cannot be had; never raises."""
    try:
        if sys.platform.startswith("linux"):
            return _inotify(os.fspath(path))
        if hasattr(select, "kqueue"):
            return _kqueue(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - never a reason for a start to fail: it is polled instead
        # OSError above all; but an event loop may refuse the descriptor in its own way (kqueue's path does not run
        # on the Linux machines the tests run on).
        log.debug("not watching %s (%s): its runtime's readiness is polled", path, exc)
    return None


def _inotify(path: str) -> LogWatch:
    fd = inotify.watch(path, inotify.IN_MODIFY)
    try:
        def drain() -> None:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):
                    pass

        return LogWatch(fd, drain, lambda: _close(fd))
    except BaseException:
        os.close(fd)
        raise


def _kqueue(path: str) -> LogWatch:
    file_fd = os.open(path, os.O_RDONLY | getattr(os, "O_EVTONLY", 0) | os.O_CLOEXEC)
    queue = select.kqueue()
    try:
        event = select.kevent(file_fd, filter=select.KQ_FILTER_VNODE, flags=select.KQ_EV_ADD | select.KQ_EV_CLEAR,
                              fflags=select.KQ_NOTE_WRITE | select.KQ_NOTE_EXTEND)
        queue.control([event], 0, 0)

        def release() -> None:
            queue.close()
            _close(file_fd)

        return LogWatch(queue.fileno(), lambda: queue.control(None, 16, 0), release)
    except BaseException:
        queue.close()
        os.close(file_fd)
        raise


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
