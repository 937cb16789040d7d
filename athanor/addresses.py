"""Listen addresses: parsing ``host:port``, writing one into a URL, and the loopback address that reaches a
listener. Kept free of aiohttp so the CLI, doctor and integrations can use them without importing the server."""

from __future__ import annotations

import ipaddress
import time


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def authority(host: str, port: int) -> str:
    """``host:port`` as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_for(host: str) -> str | None:
    """The loopback address the CLI reaches a daemon listening on ``host`` by, or None when it listens on one
    address that is not loopback (the daemon then opens a loopback listener for the admin API)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    if host == "localhost":
        return "127.0.0.1"
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until something accepts connections on host:port (used by ``athanor up``)."""
    import socket

    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return True
        time.sleep(delay)  # polling interval for a start-up wait, not test synchronisation
        delay = min(delay * 1.5, 0.25)
    return False
