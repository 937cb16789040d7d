"""Did it die? The one look at a runtime incarnation that the requests it failed and the monitor share.

A runtime that crashes with many requests in flight is reported by every one of them, and the monitor may see
it too. Each asks here about the incarnation it was served by; they share one task, which asks the service
manager once and records the crash once (the controller's ``crashed`` ignores an incarnation already replaced or
accounted for). A broken connection is not always a death: the runtime closes its sockets before it exits, so a
runtime still running is given ``EXIT_GRACE_S`` to go before the failure is called the connection's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from athanor.controller.instance import Instance, Phase
from athanor.controller.records import pid_of
from athanor.controller.stopping import STOP_GRACE_S
from athanor.controller.tasks import Spawn
from athanor.managers.base import Handle, ServiceManager

log = logging.getLogger("athanor.controller")

EXIT_GRACE_S = 2.0  # how long a broken connection waits for its runtime's death to show (it closes sockets first)

Crashed = Callable[[Instance, int, "int | None"], None]  # (instance, incarnation, exit code if known)


class DeathWatch:
    """Shared looks at runtime incarnations, one per (model, incarnation) at a time."""

    def __init__(self, spawn: Spawn, manager_of: Callable[[Handle], ServiceManager], crashed: Crashed):
        self._spawn = spawn
        self._manager_of = manager_of
        self._crashed = crashed
        self._looks: dict[tuple[str, int], asyncio.Task[bool]] = {}

    async def runtime_died(self, inst: Instance, incarnation: int) -> bool:
        """True when runtime ``incarnation`` is gone (replaced, or dead now, its crash recorded). A caller that
        goes away does not cancel the look the others share."""
        if inst.incarnation != incarnation or inst.phase not in (Phase.READY, Phase.DRAINING):
            return True
        return await asyncio.shield(self.look(inst, incarnation))

    def look(self, inst: Instance, incarnation: int) -> asyncio.Task[bool]:
        """The one look at runtime ``incarnation``: started now, or the one under way."""
        key = (inst.name, incarnation)
        task = self._looks.get(key)
        if task is None:
            task = self._looks[key] = self._spawn(self._look(inst, incarnation), f"death-{inst.name}")
            task.add_done_callback(lambda _: self._looks.pop(key, None))
        return task

    def looking_at(self, name: str) -> bool:
        """Whether a look at one of ``name``'s runtimes is under way."""
        return any(model == name for model, _ in self._looks)

    async def _look(self, inst: Instance, incarnation: int) -> bool:
        handle = inst.handle
        if handle is None:
            return True
        manager = self._manager_of(handle)
        state = await manager.observe(handle)
        if state.running:
            if not await manager.wait_exit(handle, EXIT_GRACE_S):
                return False  # still running: the failure was the connection's, not the runtime's
            state = await manager.observe(handle)
        code = state.exit_code
        if code is None and inst.incarnation == incarnation and inst.phase in (Phase.READY, Phase.DRAINING):
            code = await collect_exit(manager, handle)
        self._crashed(inst, incarnation, code)
        return True


async def collect_exit(manager: ServiceManager, handle: Handle) -> int | None:
    """The exit code of a runtime just seen dead, when its manager could not tell it yet: a process whose main
    thread has exited shows as a zombie while its other threads still exit, and only then can its exit status be
    collected. Stopping it, as its clean-up does anyway (a stop is safe on a dead job and when repeated), waits for
    that; a job that is not this daemon's child has no exit code to give (None)."""
    try:
        return await manager.stop(handle, STOP_GRACE_S)
    except Exception as exc:  # noqa: BLE001 - the crash is recorded without a code; the clean-up retries the stop
        log.warning("%s: cannot collect the exit code of pid %s: %s", handle.get("name"), pid_of(handle), exc)
        return None
