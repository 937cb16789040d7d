"""Where the gateway accepts connections, and the daemon record that tells the CLI.

The gateway listens on ``spec.listen`` (or ``serve --listen``), plus a loopback socket for the admin API when that
address is not loopback (the admin API answers loopback peers only). The record names only sockets the daemon
holds: an admin address it failed to bind would send the CLI's requests, and the admin key as a Bearer token, to
whatever other process holds it. So a loopback socket that could not be bound is recorded as ``admin: null``.

An address that cannot be bound (in use, say) is tried again, after 1 s and then at doubling intervals up to 8 s,
until it is bound or no longer wanted; the failure is said once per streak, as one event.

Sockets are bound here, before the gateway's front door exists, so that ``athanor serve`` on a busy address fails
(one line) before it re-attaches to runtimes or records anything in state.json. They listen only once the front
door serves them (``serve``): a port that accepts connections is a gateway that answers, as before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from athanor import catalog
from athanor.addresses import authority, loopback_for
from athanor.errors import AthanorError
from athanor.managers import resolve_manager
from athanor.store import Store
from athanor.timestamps import utc_timestamp

log = logging.getLogger("athanor.daemon")

ADMIN_HOST = "127.0.0.1"
BACKLOG = 128  # as aiohttp's sites had
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 8.0

Report = Callable[[str, str, str], None]  # (type: Normal/Warning, reason, message): an event of the Gateway


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to host:port, one per address ``host`` stands for ("" is every interface, and a name may
    resolve to several), made as asyncio's ``create_server`` makes them; they listen once served. Raises OSError
    when one cannot be bound (another process listens there, say)."""
    infos = list(dict.fromkeys(socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)))
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "" binds IPv4 and IPv6 apart, as asyncio does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRNOTAVAIL and len(infos) > 1:
                    continue  # one of several families not enabled here (IPv6 off, say), as asyncio skips it
                raise
            sockets.append(sock)
            sock.setblocking(False)
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_error(address: str, exc: OSError) -> str:
    return f"cannot listen on {address}: {exc.strerror or exc}"


@dataclass
class _Bound:
    """One address's sockets, and the servers that accept on them once the gateway runs."""

    host: str
    port: int
    sockets: list[socket.socket]
    servers: list[asyncio.AbstractServer] = field(default_factory=list)

    @property
    def address(self) -> str:
        return authority(self.host, self.port)


class Backoff:
    """When to try a failing address again, and whether a failure starts a streak (and so is worth saying)."""

    def __init__(self) -> None:
        self.failing: str | None = None
        self._delay = 0.0
        self._due = 0.0

    def due(self, what: str) -> bool:
        return what != self.failing or time.monotonic() >= self._due

    def failed(self, what: str) -> bool:
        """Note a failure to bind ``what``; True when it starts a streak, False for a retry that failed again."""
        first = what != self.failing
        self._delay = RETRY_FIRST_S if first else min(self._delay * 2, RETRY_MAX_S)
        self.failing, self._due = what, time.monotonic() + self._delay
        return first

    def reset(self) -> None:
        self.failing = None


class Listener:
    """The sockets the gateway accepts on. Moving to a new address opens the new sockets before closing the old
    ones (an address both need, such as the loopback one when moving from 127.0.0.1:P to a LAN address on port P,
    is kept, not opened twice), and closing a socket only stops new connections: requests and streams under way
    finish. A move between a wildcard and a specific address on one port (0.0.0.0:P to 192.168.1.5:P) cannot bind
    the new address while the old one listens: it fails (said, and retried) until the port changes too."""

    def __init__(self, store: Store):
        self._store = store
        self._accept: Callable[[], asyncio.Protocol] | None = None
        self._report: Report = lambda type_, reason, message: None
        self.main: _Bound | None = None
        self.admin: _Bound | None = None  # the admin API's loopback socket, when ``main`` is not loopback
        self._admin_retry = Backoff()
        self._move_retry = Backoff()
        self._started = ""

    @property
    def address(self) -> str:
        return self.main.address if self.main else ""

    @property
    def host(self) -> str:
        return self.main.host if self.main else ""

    def admin_address(self) -> str | None:
        """Where the CLI reaches the admin API: a loopback address this daemon holds, or None."""
        if self.main is None:
            return None
        own = loopback_for(self.main.host)
        if own is not None:
            return authority(own, self.main.port)
        return self.admin.address if self.admin else None

    def bind(self, host: str, port: int) -> None:
        """Bind the listen address at start-up, before anything else happens (OSError when it cannot)."""
        self.main = _Bound(host, port, bind(host, port))

    async def serve(self, accept: Callable[[], asyncio.Protocol], report: Report) -> None:
        """Accept connections with ``accept`` (the front door, ``ingress/wire.py``) on what ``bind`` bound (and
        the admin loopback socket, if it can be had), then record it."""
        self._accept, self._report, self._started = accept, report, utc_timestamp()
        assert self.main is not None, "bind() first"
        try:
            await self._start(self.main)
        except OSError as exc:  # another process bound it too and listened first, since bind()
            raise AthanorError(bind_error(self.address, exc)) from exc
        await self._bind_admin()
        await self._record()
        log.info("athanor serving on http://%s", self.address)

    async def follow(self, host: str, port: int) -> bool:
        """Move to host:port if that is not where the gateway listens; True when it moved. A failure is retried on
        later calls (after a back-off), and said once per streak."""
        wanted = authority(host, port)
        if wanted == self.address:
            self._move_retry.reset()
            return False
        if not self._move_retry.due(wanted):
            return False
        try:
            await self._move(host, port)
        except OSError as exc:
            message = f"{bind_error(wanted, exc)}; still serving on {self.address}; retrying"
            if self._move_retry.failed(wanted):
                log.error("%s", message)
                self._report("Warning", "ListenFailed", message)
            else:
                log.debug("again: %s", message)
            return False
        self._move_retry.reset()
        self._report("Normal", "Listening", f"now serving on {self.address}")
        return True

    async def retry_admin(self) -> None:
        """Try again for the admin API's loopback socket, if it is wanted, missing and due."""
        if self.main is None or self.admin is not None or loopback_for(self.main.host) is not None:
            return
        if self._admin_retry.due(authority(ADMIN_HOST, self.main.port)) and await self._bind_admin():
            await self._record()

    async def _bind_admin(self) -> bool:
        """Bind and serve the admin loopback socket when the listen address is not loopback; True if newly bound."""
        assert self.main is not None
        if self.admin is not None or loopback_for(self.main.host) is not None:
            return False
        address = authority(ADMIN_HOST, self.main.port)
        try:
            admin = _Bound(ADMIN_HOST, self.main.port, await asyncio.to_thread(bind, ADMIN_HOST, self.main.port))
        except OSError as exc:
            message = (f"no loopback listener for the admin API ({bind_error(address, exc)}): athanor start, stop "
                       "and the other commands that ask the gateway cannot reach it; retrying")
            if self._admin_retry.failed(address):
                log.warning("%s", message)
                self._report("Warning", "ListenFailed", message)
            else:
                log.debug("again: %s", message)
            return False
        await self._start(admin)
        self.admin = admin
        if self._admin_retry.failing:
            self._report("Normal", "Listening", f"the admin API answers on {address} now")
        self._admin_retry.reset()
        return True

    async def _move(self, host: str, port: int) -> None:
        """Listen on host:port (raises OSError when it cannot); then close what is no longer needed."""
        held = {(b.host, b.port): b for b in (self.main, self.admin) if b is not None}
        main = held.get((host, port)) or _Bound(host, port, await asyncio.to_thread(bind, host, port))
        if not main.servers:
            await self._start(main)
        admin = held.get((ADMIN_HOST, port)) if loopback_for(host) is None else None
        if admin is main:
            admin = None
        old = [b for b in held.values() if b is not main and b is not admin]
        self.main, self.admin = main, admin
        self._admin_retry.reset()
        for bound in old:
            await self._stop(bound)
        await self._bind_admin()
        await self._record()
        log.info("athanor serving on http://%s", self.address)

    async def _start(self, bound: _Bound) -> None:
        assert self._accept is not None
        loop = asyncio.get_running_loop()
        for sock in bound.sockets:
            bound.servers.append(await loop.create_server(self._accept, sock=sock, backlog=BACKLOG))

    @staticmethod
    async def _stop(bound: _Bound) -> None:
        for server in bound.servers:
            server.close()  # closes the listening socket; connections under way go on
        for sock in bound.sockets:
            sock.close()
        bound.servers = []

    async def close(self) -> None:
        for bound in (self.main, self.admin):
            if bound is not None:
                await self._stop(bound)
        self.main = self.admin = None

    async def _record(self) -> None:
        record = {"pid": os.getpid(), "listen": self.address, "admin": self.admin_address(),
                  "manager": resolve_manager(catalog.gateway_spec(self._store.models.load())["serviceManager"]),
                  "startedAt": self._started, "createTime": _create_time()}
        await asyncio.to_thread(record_daemon, self._store, record)


def _create_time() -> float:
    import psutil

    return psutil.Process().create_time()


def record_daemon(store: Store, record: dict[str, Any] | None) -> None:
    """Write (or clear, with None) the daemon record in state.json: what the CLI reads to find the gateway."""
    with store.state.edit() as state:
        state["daemon"] = record
