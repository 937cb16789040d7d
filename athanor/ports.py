"""Runtime ports: each model gets one once, from a range, and keeps it while it exists.

The default range lies below every common ephemeral range (Linux 32768-60999, macOS 49152-65535). A port inside
it can be taken at any moment as the source port of some outgoing connection, and a runtime that then fails to
bind may not even exit (mlx_lm.server keeps running without listening).
"""

from __future__ import annotations

import socket
from collections.abc import Collection

from athanor.errors import AthanorError

DEFAULT_RANGE = (28100, 29099)


def port_is_free(port: int, host: str = "127.0.0.1", *, reuse_address: bool = False) -> bool:
    """Whether a server could bind ``port`` now. With ``reuse_address`` the check binds the way the runtimes do,
    so connections of a runtime that just stopped (TIME_WAIT) do not count as a holder."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str:
    """Who holds ``port``, as far as this user may see: 'pid 123 (llama-server)', or a plain description."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return "another process"
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return "another process"


def allocate_port(taken: Collection[int], start: int, end: int) -> int:
    """The lowest port in [start, end] that no model holds and nothing else is listening on right now."""
    for port in range(start, end + 1):
        if port not in taken and port_is_free(port):
            return port
    raise AthanorError(
        f"no free port left in the gateway's portRange {start}-{end} ({len(taken)} held by models); "
        "widen spec.portRange in the Gateway"
    )
