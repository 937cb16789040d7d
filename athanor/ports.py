"""Runtime ports: each model gets one once, from a range, and keeps it while it exists."""

from __future__ import annotations

import socket
from collections.abc import Collection

from athanor.errors import AthanorError

DEFAULT_RANGE = (40880, 41879)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def allocate_port(taken: Collection[int], start: int, end: int) -> int:
    """The lowest port in [start, end] that no model holds and nothing else is listening on right now."""
    for port in range(start, end + 1):
        if port not in taken and port_is_free(port):
            return port
    raise AthanorError(
        f"no free port left in the gateway's portRange {start}-{end} ({len(taken)} held by models); "
        "widen spec.portRange in the Gateway"
    )
