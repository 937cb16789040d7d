"""The monitor: one look at every instance, every half second, deciding what the controller should do next.

It notices runtimes that died (their crash recorded once, with the requests that noticed it too), forgets
deleted models once stopped and stops the loaded ones, reloads models whose spec changed, unloads idle ones,
schedules liveness probes, and every few seconds has the service managers reap exited children and rotate logs
and checks whether what loaded runtimes run drifted from their spec. The look itself only looks: every stop,
reload, probe and clean-up it decides on runs as a task of its own, so it never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from athanor.controller.deaths import DeathWatch
from athanor.controller.health import HealthChecks
from athanor.controller.instance import Instance, Phase
from athanor.controller.spec_changes import SpecChanges
from athanor.controller.tasks import Spawn
from athanor.managers import Managers
from athanor.managers.base import Handle, ServiceManager

log = logging.getLogger("athanor.controller")

MONITOR_INTERVAL_S = 0.5
HOUSEKEEPING_INTERVAL_S = 2.0  # reaping exited children and rotating logs
DRIFT_INTERVAL_S = 5.0  # comparing what loaded models run with what their spec says now


class Watched(Protocol):
    """What the monitor needs from whoever owns the instances (the Controller), and no more."""

    instances: dict[str, Instance]
    managers: Managers

    def doc(self) -> dict[str, Any]: ...

    def gateway(self) -> dict[str, Any]: ...

    def setting(self, obj: dict[str, Any] | None, key: str) -> Any: ...

    def manager_of(self, handle: Handle) -> ServiceManager: ...

    def crashed(self, inst: Instance, incarnation: int, exit_code: int | None) -> None: ...

    def outdated(self, inst: Instance) -> bool: ...

    def stopping(self, name: str) -> bool: ...

    def settled(self, inst: Instance) -> bool: ...

    def forget(self, inst: Instance) -> None: ...

    async def stop(self, name: str, *, drain: bool = True) -> None: ...


class Monitor:
    """The look (``check``) and the loop that repeats it (``watch``); the schedules of its slower duties."""

    def __init__(self, watched: Watched, deaths: DeathWatch, health: HealthChecks, specs: SpecChanges,
                 spawn: Spawn):
        self._watched = watched
        self._deaths = deaths
        self._health = health
        self._specs = specs
        self._spawn = spawn
        self.next_housekeeping = 0.0  # monotonic time of the next housekeeping round
        self._housekeeper: asyncio.Task[None] | None = None
        self._next_drift_check = time.monotonic() + DRIFT_INTERVAL_S
        self._drift_checker: asyncio.Task[None] | None = None

    async def watch(self) -> None:
        """Look every half second, until cancelled."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one bad check
                log.exception("monitor check failed")

    async def check(self) -> None:
        """One look at every instance: the managers are asked about the running ones together, then what is
        decided (a stop, a probe, housekeeping) runs as a task of its own, so the look itself is short."""
        c = self._watched
        await self._notice_deaths()
        models = c.doc()["models"]
        now = time.monotonic()
        for inst in list(c.instances.values()):
            if inst.name not in models and c.settled(inst):
                c.forget(inst)
                continue
            if inst.phase is not Phase.READY or c.stopping(inst.name) or self._specs.reloading(inst.name):
                continue
            obj = models.get(inst.name)
            if obj is None:
                log.info("%s was deleted: stopping it", inst.name)
                self._spawn(c.stop(inst.name), f"stop-deleted-{inst.name}")
                continue
            if c.outdated(inst):
                log.info("%s: its spec changed: reloading it", inst.name)
                self._specs.reload_soon(inst)
                continue
            idle_limit = c.idle_limit(inst, obj)
            idle_for = now - inst.last_used
            if idle_limit is not None and inst.inflight == 0 and idle_for > idle_limit:
                log.info("%s idle for %.0f s: unloading", inst.name, idle_for)
                self._spawn(c.stop(inst.name), f"stop-idle-{inst.name}")
                continue
            self._health.maybe_probe(inst, now)
        if now >= self.next_housekeeping and (self._housekeeper is None or self._housekeeper.done()):
            self.next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
            self._housekeeper = self._spawn(self._housekeeping(), "housekeeping")
        if now >= self._next_drift_check and (self._drift_checker is None or self._drift_checker.done()):
            self._next_drift_check = now + DRIFT_INTERVAL_S
            self._drift_checker = self._spawn(self._specs.reload_drifted(c.instances.values()), "drift")

    async def _notice_deaths(self) -> None:
        """Ask the managers about every running runtime at once; record the deaths they report."""
        c = self._watched
        watched = [(i, i.incarnation, i.handle) for i in c.instances.values()
                   if i.phase in (Phase.READY, Phase.DRAINING) and i.handle]
        seen = await asyncio.gather(*(c.manager_of(h).observe(h) for _, _, h in watched), return_exceptions=True)
        for (inst, incarnation, handle), state in zip(watched, seen, strict=True):
            if isinstance(state, BaseException):
                log.warning("%s: cannot ask its manager about it: %s", inst.name, state)
            elif not state.running and inst.handle is handle:  # about the runtime observed, not a newer one
                if state.exit_code is not None:
                    c.crashed(inst, incarnation, state.exit_code)
                else:  # dead, its exit code not collected yet: the look requests share finds it
                    self._deaths.look(inst, incarnation)

    async def _housekeeping(self) -> None:
        """Each manager collects its exited children and rotates the logs of the jobs it runs."""
        c = self._watched
        by_manager: dict[int, tuple[ServiceManager, list[Handle]]] = {}
        for inst in c.instances.values():
            if inst.handle is not None:
                manager = c.manager_of(inst.handle)
                by_manager.setdefault(id(manager), (manager, []))[1].append(inst.handle)
        process = c.managers.get("process", c.gateway())
        by_manager.setdefault(id(process), (process, []))  # its children are reaped even when none is loaded
        for manager, handles in by_manager.values():
            await manager.housekeeping(handles)
