"""File notifications, where the kernel gives them: a starting runtime's log, and the desired state's file.

**A starting runtime's log** (``watch_log``). A runtime says it is ready in its log as it becomes ready
(llama-server's ``listening on`` line comes a fraction of a millisecond before its ``/health`` answers 200).
Probing only on a timer leaves half a poll interval on every swap; probing on every write of the log notices
readiness within one probe of it. The log is a file the service manager appends to (never a pipe: the runtime
outlives the daemon), so the kernel's file notifications are the way to hear it: inotify on Linux (through libc:
the standard library has no binding), kqueue on macOS and the BSDs. Where neither is available, or the file cannot
be watched, ``watch_log`` gives None and readiness is polled as before: the watch only ever adds probes, it never
decides readiness.

**models.json** (``watch_entry``). Every request must see an ``apply`` that finished before it was sent, which a
``stat`` of the file per request guaranteed, at the price of a system call and a stat result per request. A
watch of its directory for that name gives the same guarantee for nothing per request, on Linux: inotify queues
its event during the rename (or the close of a write) itself, which makes the watch's descriptor ready then, and
epoll reports ready descriptors in the order they became ready, which the event loop runs in that order (uvloop
and asyncio alike). So a change made before a request's bytes arrived is heard before the request is parsed.
kqueue documents no such order, so elsewhere ``watch_entry`` gives None and each request keeps its stat.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import select
import struct
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("athanor.controller")

_IN_MODIFY = 0x2
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x1000000
# What an entry's writer does to it (a rename into place, a write closed, a creation or removal) and what ends a
# watch of its directory.
_ENTRY_EVENTS = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_ONLYDIR
_WATCH_GONE = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of NUL-padded name


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


def _inotify(path: str) -> LogWatch | None:
    fd = _inotify_watching(path, _IN_MODIFY)
    if fd is None:
        return None

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass

    try:
        return LogWatch(fd, drain, lambda: _close(fd))
    except BaseException:
        os.close(fd)
        raise


def _inotify_watching(path: str, mask: int) -> int | None:
    """A non-blocking inotify descriptor watching ``path`` for ``mask``; None where libc has no inotify."""
    libc = _libc()
    if libc is None:
        return None
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    if libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
        errno = ctypes.get_errno()
        os.close(fd)
        raise OSError(errno, os.strerror(errno))
    return fd


class EntryWatch:
    """Hears one entry of a directory (a file, by name) change: ``changed`` is set each time it may have, and
    cleared by the reader before it looks; ``lost`` once the watch can tell no more (the directory was removed or
    moved, or the kernel refused it), when the reader must look every time. ``close`` when done."""

    def __init__(self, fd: int, name: bytes):
        self.changed = True  # whatever happened before the watch began is unknown: the first reader looks
        self.lost = False
        self._fd, self._name = fd, name
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            while True:
                self._heard(os.read(self._fd, 65536))
        except BlockingIOError:
            pass
        except OSError:
            self.lost = True
            self.close()

    def _heard(self, data: bytes) -> None:
        at = 0
        while at + _EVENT.size <= len(data):
            _, mask, _, size = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size:at + _EVENT.size + size].rstrip(b"\0")
            at += _EVENT.size + size
            if mask & _WATCH_GONE:
                self.lost = True
            if mask & _IN_Q_OVERFLOW or name == self._name:
                self.changed = True

    def close(self) -> None:
        """Stop watching (the descriptor is closed in a worker thread, as ``LogWatch``'s)."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        self._loop.remove_reader(fd)
        try:
            self._loop.run_in_executor(None, _close, fd)
        except RuntimeError:
            _close(fd)


def watch_entry(path: str | Path) -> EntryWatch | None:
    """A watch on the entry ``path`` of its directory (the file need not exist), or None where the ordering the
    module describes cannot be had (not Linux, no inotify, the directory cannot be watched); never raises."""
    if not sys.platform.startswith("linux"):
        return None
    path = Path(path)
    try:
        fd = _inotify_watching(os.fspath(path.parent), _ENTRY_EVENTS)
        if fd is None:
            return None
        try:
            return EntryWatch(fd, os.fsencode(path.name))
        except BaseException:
            os.close(fd)
            raise
    except Exception as exc:  # noqa: BLE001 - the reader stats the file instead
        log.debug("not watching %s (%s): it is looked at on every request", path, exc)
    return None


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


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library this process runs with, if it has inotify (looked up once)."""
    library = ctypes.CDLL(None, use_errno=True)
    if not hasattr(library, "inotify_init1"):
        return None
    library.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return library
