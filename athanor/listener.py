"""Where the gateway accepts connections, and the daemon record that tells the CLI.

The gateway listens on ``spec.listen`` (or ``serve --listen``), plus a loopback socket for the admin API when that
address is not loopback (the admin API answers loopback peers only), plus ``spec.ollama.listen`` when set: Ollama's
clients expect 127.0.0.1:11434 and are served there without configuration. Every socket meets the same front door
(the same routes, the same guard); one socket may fill several of these roles. The record names only sockets the daemon
holds: an admin address it failed to bind would send the CLI's requests, and the admin key as a Bearer token, to
whatever other process holds it. So a loopback socket that could not be bound is recorded as ``admin: null``.

An address that cannot be bound (in use, say) is tried again, after 1 s and then at doubling intervals up to 8 s,
until it is bound or no longer wanted; the failure is said once per streak, as one event.

Sockets are bound here, before the gateway's front door exists, so that ``athanor serve`` on a busy address fails
(one line) before it re-attaches to runtimes or records anything in state.json. They listen only once the front
door serves them (``serve``): a port that accepts connections is a gateway that answers, as before. The Ollama
address is not worth failing for: a real Ollama on 11434 is common, and the gateway then serves its main address,
says so as a Warning event and takes the Ollama address once it is free.
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
from athanor.addresses import authority, loopback_for, parse_listen
from athanor.errors import AthanorError
from athanor.managers import resolve_manager
from athanor.store import Store
from athanor.timestamps import utc_timestamp

log = logging.getLogger("athanor.daemon")

ADMIN_HOST = "127.0.0.1"
BACKLOG = 128  # as aiohttp's sites had
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 8.0

_EVERY_IPV4, _EVERY_IPV6 = "0.0.0.0", "::"

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

    def covers(self, host: str, port: int) -> bool:
        """Whether connections to host:port reach these sockets (the same address, or every interface's)."""
        if port != self.port:
            return False
        return self.host in (host, "") or self.host == (_EVERY_IPV6 if ":" in host else _EVERY_IPV4)


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
        self._hosts_changed: Callable[..., None] = lambda *hosts: None
        self._hosts_told: tuple[str, ...] = ()
        self.main: _Bound | None = None
        self.admin: _Bound | None = None  # the admin API's loopback socket, when ``main`` is not loopback
        self.ollama: _Bound | None = None  # what serves spec.ollama.listen (``main`` or ``admin``, if one covers it)
        self._ollama_address = ""  # spec.ollama.listen as written, when ``ollama`` serves it
        self._admin_retry = Backoff()
        self._move_retry = Backoff()
        self._ollama_retry = Backoff()
        self._started = ""

    @property
    def address(self) -> str:
        return self.main.address if self.main else ""

    @property
    def host(self) -> str:
        return self.main.host if self.main else ""

    @property
    def ollama_address(self) -> str | None:
        """spec.ollama.listen while the gateway serves it, else None."""
        return self._ollama_address if self.ollama else None

    def hosts(self) -> list[str]:
        """The hosts of the addresses clients are told to use (the guard serves Host values naming them)."""
        return [b.host for b in (self.main, self.ollama) if b is not None]

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

    async def serve(self, accept: Callable[[], asyncio.Protocol], report: Report, ollama: str | None = None,
                    hosts_changed: Callable[..., None] = lambda *hosts: None) -> None:
        """Accept connections with ``accept`` (the front door, ``ingress/wire.py``) on what ``bind`` bound (and
        the admin loopback socket, and ``ollama``'s, if they can be had), then record it. ``hosts_changed(*hosts)``
        hears of the hosts served (``hosts()``) before each record, so the guard admits them when the CLI (or a
        test) sees the record."""
        self._accept, self._report, self._started = accept, report, utc_timestamp()
        self._hosts_changed = hosts_changed
        assert self.main is not None, "bind() first"
        try:
            await self._start(self.main)
        except OSError as exc:  # another process bound it too and listened first, since bind()
            raise AthanorError(bind_error(self.address, exc)) from exc
        await self._bind_admin()
        log.info("athanor serving on http://%s", self.address)
        await self.follow_ollama(ollama, starting=True)
        await self._record()

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
            self._bind_failed(self._move_retry, wanted, message)
            return False
        self._move_retry.reset()
        self._report("Normal", "Listening", f"now serving on {self.address}")
        return True

    async def follow_ollama(self, listen: str | None, starting: bool = False) -> bool:
        """Serve Ollama's clients on ``listen`` too (spec.ollama.listen; None: no second address); True when what
        serves it changed. An address that cannot be bound is retried on later calls (after a back-off) and said
        once per streak, as a Warning: the gateway goes on serving its main address meanwhile. ``starting``: from
        ``serve``, which records the result itself."""
        if listen is None:
            self._ollama_retry.reset()
            if self.ollama is None:
                return False
            gone, self.ollama, address = self.ollama, None, self._ollama_address
            await self._release(gone)
            await self._record()
            log.info("no longer serving Ollama clients on %s", address)
            self._report("Normal", "ListenStopped", f"no longer serving Ollama clients on {address} "
                                                    "(spec.ollama.listen removed)")
            return True
        if self.ollama is not None and listen == self._ollama_address:
            self._ollama_retry.reset()
            return False
        if not self._ollama_retry.due(listen):
            return False
        host, port = parse_listen(listen)
        gone = self.ollama if self.ollama is not None and self.ollama.port == port else None
        if gone is not None:
            # The same port on another interface (0.0.0.0:11434 to 127.0.0.1:11434, say) cannot be bound while the
            # old socket listens; and a wider socket kept would go on serving where the spec no longer says.
            self.ollama = None
            await self._release(gone)
        try:
            bound = self._covering(host, port) or await self._open(host, port)
        except OSError as exc:
            if gone is not None and not starting:
                await self._record()
            still = f"Ollama clients are still served on {self._ollama_address}; " if self.ollama else ""
            message = (f"Ollama clients: {bind_error(listen, exc)} (spec.ollama.listen; is Ollama itself running "
                       f"there?); {still}the gateway serves on {self.address} meanwhile; retrying")
            self._bind_failed(self._ollama_retry, listen, message)
            return False
        old, recovered = self.ollama, self._ollama_retry.failing is not None
        self.ollama, self._ollama_address = bound, listen
        self._ollama_retry.reset()
        if old is not None:
            await self._release(old)
        if not starting:
            await self._record()
        log.info("serving Ollama clients on http://%s", listen)
        if recovered or not starting:  # a start that went as planned is not an event
            self._report("Normal", "Listening", f"Ollama clients are served on {listen} now")
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
            admin = self._held(ADMIN_HOST, self.main.port) or await self._open(ADMIN_HOST, self.main.port)
        except OSError as exc:
            message = (f"no loopback listener for the admin API ({bind_error(address, exc)}): athanor start, stop "
                       "and the other commands that ask the gateway cannot reach it; retrying")
            self._bind_failed(self._admin_retry, address, message, logging.WARNING)
            return False
        self.admin = admin
        if self._admin_retry.failing:
            self._report("Normal", "Listening", f"the admin API answers on {address} now")
        self._admin_retry.reset()
        return True

    async def _move(self, host: str, port: int) -> None:
        """Listen on host:port (raises OSError when it cannot); then close what is no longer needed."""
        main = self._held(host, port) or await self._open(host, port)
        admin = self._held(ADMIN_HOST, port) if loopback_for(host) is None else None
        if admin is main:
            admin = None
        old = [b for b in (self.main, self.admin) if b is not None]
        self.main, self.admin = main, admin
        self._admin_retry.reset()
        for bound in old:
            await self._release(bound)
        await self._bind_admin()
        await self._record()
        log.info("athanor serving on http://%s", self.address)

    def _bind_failed(self, retry: Backoff, address: str, message: str, level: int = logging.ERROR) -> None:
        """An address that could not be bound: said once per streak (the log and a Warning event), then only at
        debug level while it is retried."""
        if retry.failed(address):
            log.log(level, "%s", message)
            self._report("Warning", "ListenFailed", message)
        else:
            log.debug("again: %s", message)

    def _held(self, host: str, port: int) -> _Bound | None:
        """The sockets this daemon holds on exactly host:port, in whichever role."""
        return next((b for b in self._roles() if (b.host, b.port) == (host, port)), None)

    def _covering(self, host: str, port: int) -> _Bound | None:
        """Sockets this daemon holds that connections to host:port reach already (binding it would fail)."""
        return next((b for b in self._roles() if b.covers(host, port)), None)

    def _roles(self) -> list[_Bound]:
        return [b for b in (self.main, self.admin, self.ollama) if b is not None]

    async def _open(self, host: str, port: int) -> _Bound:
        """New sockets on host:port, served (raises OSError when they cannot be bound or listen)."""
        bound = _Bound(host, port, await asyncio.to_thread(bind, host, port))
        try:
            await self._start(bound)
        except OSError:
            await self._stop(bound)
            raise
        return bound

    async def _release(self, bound: _Bound) -> None:
        """Close ``bound`` unless another role still serves with it."""
        if all(bound is not b for b in self._roles()):
            await self._stop(bound)

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
        held = {id(b): b for b in self._roles()}
        self.main = self.admin = self.ollama = None
        for bound in held.values():
            await self._stop(bound)

    async def _record(self) -> None:
        hosts = tuple(self.hosts())
        if hosts != self._hosts_told:
            self._hosts_changed(*hosts)
            self._hosts_told = hosts
        record = {"pid": os.getpid(), "listen": self.address, "admin": self.admin_address(),
                  "ollama": self.ollama_address,
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
