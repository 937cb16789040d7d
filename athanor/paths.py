"""Where athanor keeps its files. One function per location, so tests can point ATHANOR_HOME anywhere.

Everything athanor creates under ATHANOR_HOME is private to its user, whatever the umask: ``models.json`` names
the executables the daemon runs, so a file another local user could rewrite would let them run code as us.
Directories are 0700 and files 0600: make them with ``ensure_private_dir`` and ``open_private_file``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from athanor.errors import StoreError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def athanor_home() -> Path:
    """``$ATHANOR_HOME`` or ``~/.athanor``; not created here (read-only commands must not create it)."""
    return Path(os.environ.get("ATHANOR_HOME") or Path.home() / ".athanor").expanduser()


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and any missing parents) 0700, or tighten an existing one of ours that others may write.

    Missing parents are made 0700 too: a world-writable parent would let another user swap the directory out.
    An existing directory owned by someone else is left as it is (we could not change it anyway).
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            pass  # another athanor process made it first; it is checked below like any existing one
        except OSError as exc:
            raise StoreError(f"{directory}: cannot create directory: {exc.strerror}") from exc
        else:
            os.chmod(directory, PRIVATE_DIR_MODE)  # the umask may have taken bits we need (0o700 & ~umask)
    _tighten(path)
    return path


def _tighten(path: Path) -> None:
    """Drop group/other access from a directory of ours that others could write into."""
    try:
        info = path.stat()
    except OSError as exc:
        raise StoreError(f"{path}: cannot use directory: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"{path}: exists but is not a directory")
    if info.st_uid == os.getuid() and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(path, PRIVATE_DIR_MODE)


def open_private_file(path: Path, flags: int) -> int:
    """``os.open`` that creates ``path`` 0600 whatever the umask, and tightens an existing file of ours.

    ``flags`` are the usual ``os.O_*`` flags; ``O_CREAT`` is added. The caller owns (and closes) the descriptor.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open: {exc.strerror}") from exc
    info = os.fstat(fd)
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    return fd


def data_path(relative: str) -> Path:
    """A file shipped with athanor (schema, templates, example specs).

    In a wheel they live in ``athanor/_data``; in a source checkout (editable install) at the repo's top level.
    """
    here = Path(__file__).resolve().parent
    for base in (here / "_data", here.parent):
        candidate = base / relative
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"athanor data file {relative!r} is missing from the installation")
