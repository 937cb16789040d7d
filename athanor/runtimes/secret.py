"""The runtime secret: what lets the gateway, and only the gateway, talk to a runtime's own port.

A runtime listens on a predictable loopback port. Without a secret, any local process could skip the gateway's
API keys there, and any web page the user visits could read completions from it (llama-server echoes the page's
Origin; mlx_lm.server answers ``*``). So each start of a runtime gets a fresh random secret, written 0600 to
``$ATHANOR_HOME/run/<model>.key`` before the job starts. The runtime reads the file (llama-server's
``--api-key-file``, the MLX servers through ``athanor.runtimes.guarded``), so the secret never appears in an argv
that ``ps`` shows; the gateway sends it on every request it forwards and every probe it makes.

The file stays as it is while the job may run: a service manager that restarts the job by itself (launchd's
KeepAlive, systemd's Restart) starts it with the same secret, and a gateway that re-attaches after a restart reads
the file once and keeps the secret with the runtime incarnation (never a disk read per request). Once athanor has
stopped the job, the next start's secret is written at once (``spare``): replacing the file is a tenth of a
millisecond or more of a swap's critical path otherwise (on ext4, a rename over a file starts its writeback).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

from athanor.errors import StoreError
from athanor.paths import ensure_private_dir
from athanor.runtimes.launch import LaunchSpec
from athanor.store.files import atomic_write_text

SECRET_DIR = "run"
SECRET_BYTES = 32  # token_urlsafe(32): 43 characters, 256 bits


def secret_path(home: Path, name: str) -> Path:
    """Where model ``name``'s runtime secret lives under ``home``."""
    return home / SECRET_DIR / f"{name}.key"


def issue_secret(path: Path) -> str:
    """Write a fresh secret to ``path`` (0600, its directory 0700), replacing the last start's, and return it.

    Replaced atomically: a runtime that a service manager restarts at this very moment reads the old secret or the
    new one, never half of one. Raises StoreError when the file cannot be written."""
    secret = secrets.token_urlsafe(SECRET_BYTES)
    try:
        ensure_private_dir(path.parent)
        # Not fsynced: it is issued at every start, on the swap's critical path, and no runtime outlives a power
        # loss; a daemon that restarts finds it in the page cache.
        atomic_write_text(path, secret + "\n", durable=False)
    except OSError as exc:
        raise StoreError(f"{path}: cannot write the runtime secret: {exc.strerror or exc}") from exc
    return secret


def secret_headers(secret: str | None) -> dict[str, str]:
    """What every request to a runtime carries: the secret of its start, when it has one."""
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def read_secret(path: Path) -> str | None:
    """The secret a running runtime was started with (re-attach), or None when its file is gone or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.strip() or None


def issued(launch: LaunchSpec, spare: tuple[str, str] | None = None) -> LaunchSpec:
    """``launch`` with a fresh secret for this start, written where its argv says (unchanged when it names none).
    ``spare``: (file, secret) written since the model's last job stopped, and used by no start yet. Call it before
    the job starts; raises StoreError when the file cannot be written."""
    if not launch.secret_file:
        return launch
    if spare is not None and spare[0] == launch.secret_file:
        return replace(launch, secret=spare[1])
    return replace(launch, secret=issue_secret(Path(launch.secret_file)))


def spare(path: str) -> tuple[str, str] | None:
    """The next start's secret, written to ``path`` now that the job using it has stopped: (path, secret), or None
    when it cannot be written (the start then tries, and says why)."""
    try:
        return path, issue_secret(Path(path))
    except StoreError:
        return None


def recalled(launch: LaunchSpec) -> LaunchSpec:
    """``launch`` with the secret its running runtime was started with, read from its file (re-attach); ``secret``
    stays None when the file is gone, and such a runtime cannot be talked to."""
    if not launch.secret_file:
        return launch
    return replace(launch, secret=read_secret(Path(launch.secret_file)))
