"""An inotify descriptor watching one path, through libc (the standard library has no binding; Linux only).

Shared by the two watches the controller keeps: a starting runtime's log (``log_watch.py``) and the store's
directory (``dirwatch.py``).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x400, 0x800, 0x8000


def watch(path: str, mask: int) -> int:
    """A non-blocking, close-on-exec inotify descriptor watching ``path`` for ``mask``; OSError when none can be
    had (no inotify in this C library, the limit of instances or watches reached, no such path)."""
    libc = _libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "no inotify in this C library")
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"inotify_init1: {os.strerror(code)}")
    if libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise OSError(code, os.strerror(code))
    return fd


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library this process runs with, if it has inotify (looked up once)."""
    library = ctypes.CDLL(None, use_errno=True)
    if not hasattr(library, "inotify_init1"):
        return None
    library.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return library
