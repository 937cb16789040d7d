"""The daemon: ingress + controller in one process, with a small admin API the CLI talks to.

Start-up re-attaches to runtimes a previous daemon left running (a crash or ``kill -9`` of the daemon does not
restart models). A clean shutdown (SIGTERM, SIGINT, ``athanor down``) stops every runtime it manages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from aiohttp import web

from athanor import catalog
from athanor.addresses import authority, loopback_for, parse_listen
from athanor.controller.controller import Controller
from athanor.controller.readiness import probe_session
from athanor.errors import AthanorError
from athanor.ingress.admin import add_admin_routes
from athanor.ingress.app import create_app
from athanor.ingress.upstream import UpstreamPool
from athanor.managers import Managers, resolve_manager
from athanor.store import Store
from athanor.units import parse_duration

log = logging.getLogger("athanor.daemon")

LISTEN_CHECK_S = 1.0


async def serve(store: Store, listen: str | None = None) -> None:
    """Run until SIGTERM/SIGINT. ``listen`` overrides the Gateway's ``spec.listen`` (and then a change of it in
    the spec is not followed)."""
    gateway = catalog.gateway_spec(store.models.load())
    address = listen or gateway["listen"]
    host, port = parse_listen(address)
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
        listener = Listener(runner, store)
        await listener.open(host, port)
        helpers = [asyncio.create_task(_watch_models(store, controller), name="cache-watch")]
        if listen is None:
            helpers.append(asyncio.create_task(_follow_listen(controller, listener, app), name="listen"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("shutting down: stopping runtimes")
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await listener.close()  # no new connections; requests under way go on until the runtimes stop
            await controller.close()
            await runner.cleanup()
            pool.close()
            await asyncio.to_thread(_record_daemon, store, None)


class Listener:
    """The sockets the gateway accepts on: the listen address, plus a loopback one for the admin API when the
    listen address is not loopback. Moving to a new address opens the new sockets before closing the old ones,
    and closing a socket only stops new connections: requests and streams under way finish."""

    def __init__(self, runner: web.AppRunner, store: Store):
        self._runner = runner
        self._store = store
        self.sites: list[web.TCPSite] = []
        self.address = ""

    async def open(self, host: str, port: int) -> None:
        """Listen on host:port (raises OSError when it cannot); then close what was open before."""
        sites = [web.TCPSite(self._runner, host, port, reuse_address=True)]
        await sites[0].start()
        admin_host = loopback_for(host)
        if admin_host is None:  # the admin API answers loopback peers only: give the CLI a way in
            admin_host = "127.0.0.1"
            sites.append(web.TCPSite(self._runner, admin_host, port, reuse_address=True))
            try:
                await sites[-1].start()
            except OSError as exc:
                sites.pop()
                log.warning("no loopback listener for the admin API on port %s (%s): athanor start/stop/restart "
                            "will not reach this gateway", port, exc.strerror or exc)
        old, self.sites = self.sites, sites
        for site in old:
            await site.stop()
        self.address = authority(host, port)
        record = {"pid": os.getpid(), "listen": self.address, "admin": authority(admin_host, port),
                  "manager": resolve_manager(catalog.gateway_spec(self._store.models.load())["serviceManager"]),
                  "startedAt": catalog.now_iso(), "createTime": _create_time()}
        await asyncio.to_thread(_record_daemon, self._store, record)
        log.info("athanor serving on http://%s", self.address)

    async def close(self) -> None:
        for site in self.sites:
            await site.stop()
        self.sites = []


async def _follow_listen(controller: Controller, listener: Listener, app: web.Application) -> None:
    """Apply a new ``spec.listen`` without a restart: bind the new address, then let go of the old one."""
    from athanor.ingress.app import GUARD

    failed = None  # the address that could not be bound, said once
    while True:
        await asyncio.sleep(LISTEN_CHECK_S)  # the spec is re-read from disk when it changes; look every second
        wanted = controller.gateway()["listen"]
        host, port = parse_listen(wanted)
        if authority(host, port) == listener.address or wanted == failed:
            continue
        try:
            await listener.open(host, port)
        except OSError as exc:
            failed = wanted
            message = f"cannot listen on {wanted} ({exc.strerror or exc}); still serving on {listener.address}"
            log.error(message)
            controller.events.emit("Gateway", "default", "Warning", "ListenFailed", message)
            continue
        failed = None
        app[GUARD].rebind(host)
        controller.events.emit("Gateway", "default", "Normal", "Listening", f"now serving on {listener.address}")


async def _watch_models(store: Store, controller: Controller) -> None:
    """Register models as they appear in the watched directories, mark deleted ones missing, sync pi."""
    from athanor import actions
    from athanor.discovery.watch import watch

    async def rescan() -> None:
        try:
            result = await asyncio.to_thread(actions.scan, store, record=False)
        except AthanorError as exc:
            log.warning("rescan after a change in the model directories failed: %s", exc)
            return
        for change in result.changes:
            if change.action != "unchanged":
                controller.events.emit("Model", change.name, "Warning" if change.action == "missing" else "Normal",
                                       change.action.capitalize(), f"{change} (the model directories changed)")
        if any(c.action != "unchanged" for c in result.changes):
            await asyncio.to_thread(_sync_clients, store)

    await watch(lambda: controller.gateway()["discovery"], rescan)


def _sync_clients(store: Store) -> None:
    """Agent clients configured to follow the served models (pi) hear of the change."""
    try:
        from athanor.integrations.pi import sync_if_enabled
    except ImportError:
        return
    try:
        for message in sync_if_enabled(store, store.models.load()):
            log.info("%s", message)
    except AthanorError as exc:
        log.warning("pi sync failed: %s", exc)


def _create_time() -> float:
    import psutil

    return psutil.Process().create_time()


def _record_daemon(store: Store, record: dict[str, Any] | None) -> None:
    with store.state.edit() as state:
        state["daemon"] = record
