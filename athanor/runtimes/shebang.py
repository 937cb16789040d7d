"""Which Python a console script runs with, read from its first lines.

Two readers need it: ``launch.py`` runs the MLX servers' secret guard under that Python (the one that has the
server installed), and doctor asks that Python for the server's version. It sits here, below both, so neither
imports the other.
"""

from __future__ import annotations

import os
import shlex
import shutil


def shebang_interpreter(path: str) -> str | None:
    """The Python a console script runs with: its ``#!`` line, or pip's ``/bin/sh`` trampoline for long paths."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024).decode("utf-8", "replace")
    except OSError:
        return None
    if not head.startswith("#!"):
        return None
    lines = head.splitlines()
    try:
        words = shlex.split(lines[0][2:])
        if words and words[0] == "/bin/sh" and len(lines) > 1 and lines[1].startswith("'''exec'"):
            words = shlex.split(lines[1])[1:2]  # '''exec' '/path/to/python' "$0" "$@"
    except ValueError:
        return None
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w][:1]
        return shutil.which(words[0]) if words else None
    return words[0] if words else None
