"""One daemon per home: ``athanor serve`` holds an exclusive ``flock`` on ``$ATHANOR_HOME/daemon.lock`` for as long
as it runs.

Two daemons on one home would each manage the same runtimes: ``single`` residency breaks, each refuses the other's
ports, and the later one overwrites the daemon record, so ``athanor down`` misses the first. The lock is taken before
the daemon re-attaches or writes anything, and the kernel drops it when the process ends, even on ``kill -9`` (a
zombie has already closed its files). The descriptor is not inherited by the runtimes the daemon starts (Python opens
files non-inheritable), so a runtime that outlives its daemon does not hold the home.

Only the daemon takes it: ``apply``, ``get`` and the other commands that read or write the store use the per-file
locks of ``store/files.py`` and run beside a daemon as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os

from athanor.errors import AthanorError, StoreError
from athanor.paths import ensure_private_dir, open_private_file
from athanor.store.store import Store

LOCK_NAME = "daemon.lock"


class DaemonAlreadyRunning(AthanorError):
    """Another daemon holds this home."""


def hold_daemon_lock(store: Store, listen: str) -> int:
    """Take the home's daemon lock for the rest of this process, or refuse with the running daemon's pid and address.

    Returns the descriptor that holds it; keep it open (closing it releases the lock). ``listen`` is what this
    daemon means to listen on, written into the lock file for the message a second daemon prints.
    """
    ensure_private_dir(store.home)
    path = store.home / LOCK_NAME
    fd = open_private_file(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise StoreError(f"{path}: cannot lock: {exc.strerror}") from exc
        raise DaemonAlreadyRunning(_refusal(store, holder)) from None
    # A note for the message a second daemon prints: best-effort, as the store's lock writes its own (on a full
    # disk the daemon's own writes fail later, each with a message naming its file).
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "listen": listen}).encode(), 0)
    return fd


def _holder(fd: int) -> dict[str, object]:
    """What the holder wrote into the lock file (empty when it has yet to write it, or wrote something else)."""
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _refusal(store: Store, holder: dict[str, object]) -> str:
    """One line naming the running daemon: its record when it is the holder's (it says where it listens now), else
    what the holder wrote when it took the lock."""
    from athanor.liveness import daemon_record

    pid, listen = holder.get("pid"), holder.get("listen")
    try:
        record = daemon_record(store)
    except AthanorError:
        record = None
    if record and (pid is None or record.get("pid") == pid):
        pid, listen = record.get("pid"), record.get("listen")
    where = f", http://{listen}" if listen else ""
    return (f"another athanor daemon is already running for {store.home} (pid {pid or 'unknown'}{where}); "
            "'athanor down' stops it")
