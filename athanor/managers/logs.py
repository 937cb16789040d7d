"""Runtime logs: plain files in ``$ATHANOR_HOME/logs`` for every manager, rotated in place.

The embedded supervisor opens them itself; launchd (``StandardOutPath``) and systemd (``StandardOutput=append:``)
append to the same paths. Every writer holds its file open with O_APPEND, so rotation is copytruncate: the file is
copied and emptied in place, never renamed, and the writer's next line lands at the new end without a hole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from athanor.paths import open_private_file

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
_TAIL_BLOCK = 64 * 1024


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines, read backwards, so a huge log costs only the blocks holding them."""
    if lines <= 0:
        return []
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return []
    with fh:
        pos = fh.seek(0, os.SEEK_END)
        data = b""
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    text = data.decode("utf-8", errors="replace")
    # split("\n"), not splitlines(): a progress bar's "\r" is not a line of its own.
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    return rows[-lines:]


def rotate(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Keep the newer half of a log over ``max_bytes`` as ``NAME.1`` and empty the log in place.

    Lines written between the copy and the truncate are lost; that is the known price of copytruncate.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    rotated = path.with_name(path.name + ".1")
    tmp = path.with_name(path.name + ".1.tmp")
    with open(path, "rb") as src, open(open_private_file(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as dst:
        src.seek(size - size // 2)
        shutil.copyfileobj(src, dst)
    os.replace(tmp, rotated)
    os.truncate(path, 0)
    return True
