"""Health after readiness: is a runtime that is up still working?

Two tests, each recorded as one failure of the incarnation it tested, after which the next request restarts it
like a crashed one. Liveness: every ``healthCheck.interval`` the health endpoint of each ready runtime is asked;
``healthCheck.failureThreshold`` misses in a row mean it is hung. Generation: a run of that many server errors
answered to requests may be the requests' fault, so the controller then asks for one token itself; a runtime
that fails that too is alive but broken (mlx_lm.server after its generation thread died answers every request
with an error). One probe of each kind per model at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from athanor.controller.instance import Instance, Phase
from athanor.controller.readiness import answers, generates
from athanor.controller.tasks import Spawn
from athanor.quantities import parse_duration

log = logging.getLogger("athanor.controller")

GENERATION_PROBE_TIMEOUT_S = 60.0  # a test generation of one token waits behind requests in flight

Fail = Callable[[Instance, str, str], None]  # (instance, why, kind: Hung or Unhealthy)


class HealthChecks:
    """The probes under way and when each ready model is probed next."""

    def __init__(self, session: aiohttp.ClientSession, gateway: Callable[[], dict[str, Any]],
                 model: Callable[[str], dict[str, Any] | None], spawn: Spawn, fail: Fail):
        """``gateway``: the Gateway spec now (its ``healthCheck``); ``model``: a model's stored object (its
        artifact's task decides what a test generation asks); ``fail``: record a failure of the instance."""
        self._session = session
        self._gateway = gateway
        self._model = model
        self._spawn = spawn
        self._fail = fail
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._next_probe: dict[str, float] = {}

    def maybe_probe(self, inst: Instance, now: float) -> None:
        """Start a liveness probe of the ready ``inst`` if one is due (``now``: monotonic) and none is under way."""
        check = self._gateway()["healthCheck"]
        interval = parse_duration(check["interval"])
        if not interval or inst.name in self._probes or now < self._next_probe.get(inst.name, 0.0):
            return
        self._next_probe[inst.name] = now + interval
        timeout = parse_duration(check["timeout"]) or interval
        self._probes[inst.name] = self._spawn(self._probe(inst, inst.incarnation, timeout, check["failureThreshold"]),
                                              f"probe-{inst.name}")

    def runtime_errored(self, inst: Instance, incarnation: int, status: int) -> None:
        """A request got server error ``status`` from runtime ``incarnation``: count it, and once the run reaches
        ``healthCheck.failureThreshold`` test the runtime with a generation of its own."""
        if inst.incarnation != incarnation or inst.phase is not Phase.READY:
            return
        inst.error_streak += 1
        threshold = self._gateway()["healthCheck"]["failureThreshold"]
        key = f"generation-{inst.name}"
        if inst.error_streak >= threshold and key not in self._probes:
            self._probes[key] = self._spawn(self._probe_generation(inst, incarnation, status, key), key)

    def forget(self, name: str) -> None:
        """A model no longer tracked: its probe schedule goes too."""
        self._next_probe.pop(name, None)

    def cancel(self) -> None:
        """Shutdown: the probes under way are not waited for."""
        for task in list(self._probes.values()):
            task.cancel()

    async def _probe_generation(self, inst: Instance, incarnation: int, status: int, key: str) -> None:
        try:
            assert inst.launch is not None
            artifact = (self._model(inst.name) or {}).get("artifact") or {}
            task = artifact.get("metadata", {}).get("task")
            problem = await generates(self._session, inst.launch, GENERATION_PROBE_TIMEOUT_S, task)
        finally:
            self._probes.pop(key, None)
        if inst.incarnation != incarnation or inst.phase is not Phase.READY:
            return
        if problem is None:
            log.info("%s: %d requests in a row failed (last HTTP %d), but it generates: the requests' fault",
                     inst.name, inst.error_streak, status)
            inst.error_streak = 0
            return
        self._fail(inst, f"alive but broken: {inst.error_streak} requests in a row answered HTTP {status}, and a "
                   f"test generation failed too ({problem})", "Unhealthy")

    async def _probe(self, inst: Instance, incarnation: int, timeout: float, threshold: int) -> None:
        """Liveness after readiness: a runtime that misses ``threshold`` probes in a row is hung, and restarted
        by the next request like a crashed one (its clients get their errors as its connections close)."""
        try:
            assert inst.launch is not None
            answered = await answers(self._session, inst.launch, timeout)
        finally:
            self._probes.pop(inst.name, None)
        if inst.incarnation != incarnation or inst.phase is not Phase.READY:
            return
        inst.missed_probes = 0 if answered else inst.missed_probes + 1
        if inst.missed_probes >= threshold:
            self._fail(inst, f"not answering its health check ({threshold} probes of {timeout:g} s missed): hung",
                       "Hung")
