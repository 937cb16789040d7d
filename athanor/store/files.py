"""Crash-safe file primitives: atomic replace and an inter-process lock.

A reader must always see either the old or the new file, never a torn one, and a CLI ``apply`` racing the daemon
must not lose either write. So: write a temp file in the same directory, fsync it, rename it over the target,
fsync the directory; and serialise read-modify-write cycles with ``flock`` on a sidecar ``.lock`` file (the data
file itself is replaced by rename, so it cannot carry the lock).

A writer killed between creating its temp file and the rename leaves ``.<name>.<random>.tmp`` behind; the next
write of the same target removes it. Directories and files made here are private (see ``athanor.paths``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from athanor.errors import StoreCorruptError, StoreError
from athanor.paths import PRIVATE_FILE_MODE, ensure_private_dir, open_private_file

LOCK_TIMEOUT_S = 30.0


def atomic_write_text(path: Path, text: str, mode: int = PRIVATE_FILE_MODE, *, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` so that a crash at any point leaves the old or the new content.
    ``durable=False``: readers still see the old content or the new, never a mix, but a power loss may lose the
    write (no fsync): for a file that means nothing once the machine restarts (a running runtime's secret).

    Writes of one target must be serialised by the caller (the store holds ``locked(path)``): that is what makes
    any temp file of this target found here a leftover of a killed writer, safe to remove.
    """
    ensure_private_dir(path.parent)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _remove_stale_temps(path: Path) -> None:
    """Delete ``.<name>.<random>.tmp`` files of ``path`` left by a writer that died before its rename.

    The random part never holds a dot, so the temp files of another target (``models.json.bak`` for
    ``models.json``) never match.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[^.]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError as exc:
        raise StoreError(f"{path.parent}: cannot list directory: {exc.strerror}") from exc
    for name in names:
        if pattern.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.parent / name)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock for ``path`` (on ``path.lock``) across processes.

    Blocks up to ``timeout`` seconds, then fails with the holder's pid so a stuck process can be found.
    """
    lock_path = path.with_name(path.name + ".lock")
    ensure_private_dir(lock_path.parent)
    fd = open_private_file(lock_path, os.O_RDWR)
    try:
        with flocked(fd, timeout, lambda: f"{path}: still locked after {timeout:.0f} s by another athanor process "
                     f"(pid {os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'})"):
            # The holder's pid is only a note for the timeout message: on a full disk, the write that follows
            # must be what fails, with its own message naming its file.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def flocked(fd: int, timeout: float, busy: Callable[[], str]) -> Iterator[None]:
    """An exclusive ``flock`` on ``fd``, across threads and processes, waited for up to ``timeout`` seconds with a
    short back-off; then a StoreError with ``busy()``'s message (which may name the holder)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise StoreError(busy()) from exc
            time.sleep(delay)  # lock back-off, not test synchronisation
            delay = min(delay * 2, 0.05)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def read_json(path: Path) -> Any | None:
    """Parse ``path``; ``None`` when it does not exist. Anything unparseable is an error naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise StoreCorruptError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); left untouched") from exc
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreCorruptError(
            f"{path}:{exc.lineno}:{exc.colno}: corrupt JSON ({exc.msg}); left untouched, fix or move it away"
        ) from exc
