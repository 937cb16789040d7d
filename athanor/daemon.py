"""The daemon: ingress + controller in one process, with a small admin API the CLI talks to.

Start-up re-attaches to runtimes a previous daemon left running (a crash or ``kill -9`` of the daemon does not
restart models). A clean shutdown (SIGTERM, SIGINT, ``athanor down``) stops every runtime it manages.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Any

from athanor import catalog
from athanor.addresses import parse_listen
from athanor.controller.controller import Controller
from athanor.controller.readiness import probe_session
from athanor.errors import AthanorError
from athanor.ingress import HOT_PATH
from athanor.ingress.admin import add_admin_routes
from athanor.ingress.app import GUARD, PROXY, TELEMETRY, create_app, front_door
from athanor.ingress.protocol import GatewayRunner
from athanor.ingress.upstream import UpstreamPool
from athanor.listener import Listener, bind_error, record_daemon
from athanor.managers import Managers
from athanor.store import Store
from athanor.telemetry import db as telemetry_db
from athanor.telemetry.recorder import Recorder, retention_of

log = logging.getLogger("athanor.daemon")

LISTEN_CHECK_S = 1.0


async def serve(store: Store, listen: str | None = None) -> None:
    """Run until SIGTERM/SIGINT. ``listen`` overrides the Gateway's ``spec.listen`` (and then a change of it in
    the spec is not followed; ``spec.ollama.listen`` still is). The caller holds the home's daemon lock
    (``store/daemon_lock.py``)."""
    gateway = catalog.gateway_spec(store.models.load())
    address = listen or gateway["listen"]
    host, port = parse_listen(address)
    listener = Listener(store)
    try:  # before anything is re-attached or written: a busy address is one line and no change
        listener.bind(host, port)
    except OSError as exc:
        raise AthanorError(bind_error(address, exc)) from exc
    log.info("the hot path: %s", HOT_PATH.reason)
    # The controller's probes use aiohttp; proxied requests go through the lean pool in ingress/upstream.py.
    async with probe_session() as session:
        controller = Controller(store, Managers(store.home), session)
        adopted = await controller.reattach()
        if adopted:
            log.info("re-attached to %s", ", ".join(adopted))
        controller.start_monitor()
        pool = UpstreamPool()  # its idle limit, like the body limit, follows the Gateway spec (ingress/limits.py)
        app = create_app(controller, pool, host)
        # Per-request records in $ATHANOR_HOME/telemetry.db, written off the loop once a second.
        recorder = app[TELEMETRY] = app[PROXY].telemetry = Recorder(telemetry_db.path_in(store.home),
                                                                    lambda: retention_of(controller.gateway()))
        await recorder.open()
        add_admin_routes(app)
        # Every connection meets the front door (ingress/wire.py), which answers model requests and relays the
        # rest to the aiohttp app. Idle keep-alive connections must not hold a shutdown for aiohttp's default 60 s.
        # A client that goes away cancels its handler, on either side.
        runner = GatewayRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                               handler_cancellation=True)
        await runner.setup()
        front = front_door(app, runner.relayed)  # one front door on every socket: both APIs, one guard
        await listener.serve(front, lambda type_, reason, message: controller.events.emit(
            "Gateway", "default", type_, reason, message), ollama_listen(controller.gateway()), app[GUARD].rebind)
        helpers = [asyncio.create_task(_watch_models(store, controller), name="cache-watch"),
                   asyncio.create_task(recorder.run(), name="telemetry"),
                   asyncio.create_task(_tend_listener(controller, listener, listen is None), name="listen")]
        # What start-up made (modules, the app, the controller) lives as long as the daemon: out of the collector's
        # sight, a full collection no longer walks it, and none lands in the middle of a swap for milliseconds.
        gc.collect()
        gc.freeze()
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
            front.close()
            await runner.cleanup()
            await recorder.close()  # after the ingress: the last requests' records too
            pool.close()
            await asyncio.to_thread(record_daemon, store, None)


async def _tend_listener(controller: Controller, listener: Listener, follow_spec: bool) -> None:
    """Retry an address that could not be bound, and apply a new ``spec.listen`` (``follow_spec``) and
    ``spec.ollama.listen`` without a restart: bind the new address, then let go of the old one. The guard hears
    of the hosts served from the listener itself."""
    while True:
        await asyncio.sleep(LISTEN_CHECK_S)  # the spec is re-read from disk when it changes; look every second
        await listener.retry_admin()
        gateway = controller.gateway()
        if follow_spec:
            await listener.follow(*parse_listen(gateway["listen"]))
        await listener.follow_ollama(ollama_listen(gateway))


def ollama_listen(gateway: dict[str, Any]) -> str | None:
    """The Gateway's second address, for Ollama's clients (``spec.ollama.listen``), if it has one."""
    return (gateway.get("ollama") or {}).get("listen")


async def _watch_models(store: Store, controller: Controller) -> None:
    """Register models as they appear in the watched directories, mark deleted ones missing, sync pi."""
    from athanor import registry
    from athanor.discovery.watch import watch

    async def rescan() -> None:
        try:
            result = await asyncio.to_thread(registry.scan, store, record=False)
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
