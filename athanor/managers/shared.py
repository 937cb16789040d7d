"""Small things launchd and systemd both need: service files written only on change, handle facts, errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from athanor.managers import logs
from athanor.managers.base import Handle, JobState, LocalManager
from athanor.paths import ensure_private_dir
from athanor.store.files import LOCK_TIMEOUT_S, atomic_write_text, flocked


class ExternalManager(LocalManager):
    """What launchd and systemd do alike: wait for an exit by asking the manager, rotate the logs it appends to.
    Subclasses provide ``observe``."""

    async def observe(self, handle: Handle) -> JobState:
        raise NotImplementedError

    async def wait_exit(self, handle: Handle, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (await self.observe(handle)).running:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)  # polling the manager for an exit, bounded by the caller's timeout
        return True

    async def housekeeping(self, handles: list[Handle]) -> None:
        paths = [Path(h["log_path"]) for h in handles if h.get("log_path")]
        await asyncio.to_thread(lambda: [logs.rotate(p) for p in paths])

    def forget(self, handle: Handle) -> None:
        pass  # the manager keeps the job's record itself


def write_if_changed(path: Path, content: bytes) -> bool:
    """Write a service file atomically, and only when its bytes differ (a rewrite would look like a change).

    ``apply`` in a shell and the daemon starting a model may write the same file at once. ``atomic_write_text``
    removes any temp file of its target it finds, as a leftover of a killed writer, so its writers must take
    turns: they do under a lock on the directory, which leaves no lock file among the service files (launchd
    and systemd read that directory). The lock also makes the answer (written or not) true for this writer."""
    with _directory_locked(ensure_private_dir(path.parent)):
        try:
            if path.read_bytes() == content:
                return False
        except FileNotFoundError:
            pass
        atomic_write_text(path, content.decode("utf-8"))  # 0600: the gateway's file may carry its keys
        return True


@contextlib.contextmanager
def _directory_locked(directory: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` itself, across threads and processes; bounded like the store's."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with flocked(fd, timeout, lambda: f"{directory}: still locked after {timeout:.0f} s by another athanor "
                     "process writing a service file"):
            yield
    finally:
        os.close(fd)


def said(result: subprocess.CompletedProcess[str]) -> str:
    """What a command answered, for an error message: its exit status and its own words."""
    words = (result.stderr or result.stdout).strip() or "no message"
    return f"exit {result.returncode}: {words}"


def create_time(pid: int) -> float:
    """The process's start time, kept in a handle so a reused pid is never taken for the job's (0: unknown)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
