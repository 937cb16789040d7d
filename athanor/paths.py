"""Where athanor keeps its files. One function per location, so tests can point ATHANOR_HOME anywhere."""

from __future__ import annotations

import os
from pathlib import Path


def athanor_home() -> Path:
    """``$ATHANOR_HOME`` or ``~/.athanor``; not created here (read-only commands must not create it)."""
    return Path(os.environ.get("ATHANOR_HOME") or Path.home() / ".athanor").expanduser()


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
