"""Has anything in a directory changed since the last look? One poll(2) of an inotify watch on Linux, which costs
the daemon a seventh of the stat it stands in for on every proxied request; elsewhere, or when no watch can be
set, the answer is always "maybe", and the caller stats as before.

The answer is read when asked, never from the event loop: the kernel queues an event before the write or rename
that caused it returns, so a request sent after an ``apply`` returned finds the event waiting. (An event loop
delivers a watch's readiness in its own time, possibly after the request it should precede: ``desired.py``.)
"""

from __future__ import annotations

import logging
import os
import select
import struct
import sys
from typing import Final

from athanor.controller import inotify

log = logging.getLogger("athanor.controller")

_MASK: Final = (inotify.IN_MODIFY | inotify.IN_ATTRIB | inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_FROM
                | inotify.IN_MOVED_TO | inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_DELETE_SELF
                | inotify.IN_MOVE_SELF)
# the directory itself went: the watch too
_GONE: Final = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len (a name of len bytes follows)


class DirectoryWatch:
    """``changed()``: whether anything in ``directory`` (or the directory itself) may have changed since the last
    call. ``close()`` gives the watch back (also done when the object is collected: ``__del__``, not
    ``weakref.finalize``, which a compiled class cannot take)."""

    def __init__(self, directory: str):
        self._fd: int | None = None
        self._poll: select.poll | None = None
        if sys.platform.startswith("linux"):
            self._fd = _watch(directory)
        if self._fd is not None:
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)

    @property
    def watching(self) -> bool:
        return self._poll is not None

    def changed(self) -> bool:
        poll = self._poll
        if poll is None:
            return True
        if not poll.poll(0):
            return False
        self._drain()
        return True

    def close(self) -> None:
        self._poll = None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def _drain(self) -> None:
        assert self._fd is not None
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            at = 0
            while at + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, at)
                if mask & _GONE:  # the directory was removed or moved: from now on, "maybe" every time
                    log.info("the watch on the store's directory ended; its file is checked on every request")
                    self.close()
                    return
                at += _EVENT.size + length


def _watch(directory: str) -> int | None:
    """An inotify descriptor watching ``directory``, or None (no inotify here, or no watch could be set: the limit
    of watches or instances reached, say)."""
    try:
        return inotify.watch(directory, _MASK)
    except OSError as exc:
        log.debug("no inotify watch on %s: %s", directory, exc.strerror or exc)
        return None
