"""What a runtime binary can do, asked of the binary itself once per file.

A user's llama-server may be older than the one athanor is tested with (Homebrew's moves on its own schedule), and
an argument it does not know makes it exit at start. So a capability is read from the binary's own ``--help``,
once per file (path, size and modification time: an upgrade in place is asked again). A script is not asked: a
wrapper a user configured as the runtime may do anything when run, before it runs the real binary (if it does), so
it is taken to have no optional capability.
"""

from __future__ import annotations

import os
import subprocess
import threading

HELP_TIMEOUT_S = 5.0  # it prints its help in milliseconds; a binary that hangs is taken to lack the feature
UNIX_SOCKET_HELP = "UNIX socket"  # llama-server's --host help, since it took socket paths beside addresses

_known: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def takes_unix_socket(binary: str) -> bool:
    """Whether llama-server ``binary`` listens on a Unix socket named in ``--host`` (``runtimes/launch.py``)."""
    return UNIX_SOCKET_HELP in _help(binary)


def _help(binary: str) -> str:
    """The binary's ``--help`` output ("" when it cannot say), read once per file. Call it off the event loop."""
    try:
        st = os.stat(binary)
    except OSError:
        return ""
    key = (os.path.realpath(binary), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _known:
            return _known[key]
    try:
        with open(binary, "rb") as file:
            if file.read(2) == b"#!":
                return ""
        done = subprocess.run([binary, "--help"], capture_output=True, text=True, errors="replace",
                              timeout=HELP_TIMEOUT_S, stdin=subprocess.DEVNULL)
        said = done.stdout + done.stderr
    except (OSError, subprocess.SubprocessError):
        said = ""
    with _lock:
        _known[key] = said
    return said
