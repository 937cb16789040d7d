"""The daemon: ingress + controller in one process, with a small admin API the CLI talks to.

Start-up re-attaches to runtimes a previous daemon left running (a crash or ``kill -9`` of the daemon does not
restart models). A clean shutdown (SIGTERM, SIGINT, ``athanor down``) stops every runtime it manages.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from athanor import catalog
from athanor.controller.controller import Controller
from athanor.controller.readiness import probe_session
from athanor.ingress.admin import add_admin_routes
from athanor.ingress.app import create_app
from athanor.ingress.upstream import UpstreamPool
from athanor.managers import Managers, resolve_manager
from athanor.store import Store
from athanor.units import parse_duration

log = logging.getLogger("athanor.daemon")


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


async def serve(store: Store, listen: str | None = None) -> None:
    """Run until SIGTERM/SIGINT. ``listen`` overrides the Gateway's ``spec.listen``."""
    gateway = catalog.gateway_spec(store.models.load())
    host, port = parse_listen(listen or gateway["listen"])
    # The controller's probes use aiohttp; proxied requests go through the lean pool in ingress/upstream.py.
    async with probe_session() as session:
        controller = Controller(store, Managers(store.home), session)
        adopted = await controller.reattach()
        if adopted:
            log.info("re-attached to %s", ", ".join(adopted))
        controller.start_monitor()
        pool = UpstreamPool(parse_duration(gateway["limits"]["upstreamIdleTimeout"]))
        app = create_app(controller, pool, host, gateway["limits"]["maxRequestBytes"])
        add_admin_routes(app)
        # Idle keep-alive connections must not hold a shutdown for aiohttp's default 60 s.
        # A client that goes away cancels its handler: a request still waiting for a load never reaches the
        # runtime, and a forwarded one is closed upstream, so no generation runs for nobody.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                               handler_cancellation=True)
        await runner.setup()
        sites = [web.TCPSite(runner, host, port, reuse_address=True)]
        await sites[0].start()
        admin_host = loopback_for(host)
        if admin_host is None:  # the admin API answers loopback peers only: give the CLI a way in
            admin_host = "127.0.0.1"
            sites.append(web.TCPSite(runner, admin_host, port, reuse_address=True))
            try:
                await sites[-1].start()
            except OSError as exc:
                log.warning("no loopback listener for the admin API on port %s (%s): athanor start/stop/restart "
                            "will not reach this gateway", port, exc.strerror or exc)
        record = {"pid": os.getpid(), "listen": authority(host, port), "admin": authority(admin_host, port),
                  "manager": resolve_manager(gateway["serviceManager"]), "startedAt": catalog.now_iso(),
                  "createTime": _create_time()}
        await asyncio.to_thread(_record_daemon, store, record)
        log.info("athanor serving on http://%s", authority(host, port))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("shutting down: stopping runtimes")
            for site in sites:  # no new connections; requests under way go on until the runtimes stop
                await site.stop()
            await controller.close()
            await runner.cleanup()
            pool.close()
            await asyncio.to_thread(_record_daemon, store, None)


def _create_time() -> float:
    import psutil

    return psutil.Process().create_time()


def _record_daemon(store: Store, record: dict[str, Any] | None) -> None:
    with store.state.edit() as state:
        state["daemon"] = record


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
