"""Small things launchd and systemd both need: service files written only on change, handle facts, errors."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

from athanor.store.files import atomic_write_text


def write_if_changed(path: Path, content: bytes) -> bool:
    """Write a service file atomically, and only when its bytes differ (a rewrite would look like a change)."""
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    atomic_write_text(path, content.decode("utf-8"))
    return True


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


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
