"""The controller: desired state from the store, instances in memory, jobs through a service manager.

The ingress asks for exactly one thing: ``controller.use(name)``, a lease (``lease.py``) that admits or refuses the
request at once, then yields the runtime to send it to (``use_now`` is the same for a model serving right now, in
one step, as the fast path needs it). Behind it the controller decides whether that means nothing (ready),
waiting (a start is under way: everyone shares it), starting, or swapping.

Swap policy (anti-thrash). Requests for a model that is serving (ready, spec unchanged) go straight to it, whatever
else is loading: under ``memory`` residency one model keeps answering while another loads. Every other request
enters the swap gate (``gate.py``). A swap moves the models it stops to ``Draining``: their requests already in
flight finish first (bounded by ``DRAIN_TIMEOUT_S``), new ones queue in the gate, then the old model parks its
K/V and stops. The new one starts at once when memory holds both (``RoomPlan.fits_beside``), else after the stop. Whenever the gate passes on, waiters whose model is serving go ahead of waiters that need a
swap (bounded by ``MAX_JUMPS``), so clients alternating between models are served in batches, one swap per batch.

What can fail early fails before anything is evicted (``preflight.py``): a model that cannot start never costs
the loaded one its place.

Failures. A start that fails, a runtime that dies and a runtime that stops answering its liveness probe each
record one failure against that runtime's incarnation (``instance.py``), however many requests noticed it
(``deaths.py``: one shared look per incarnation; ``health.py``: liveness and a test generation after readiness);
the next request restarts it after a short backoff, and ``CRASH_LIMIT`` failures in ``CRASH_WINDOW_S`` leave it
``Failed`` until ``athanor restart`` (``failures.py``).

How one runtime is started, stopped and cleaned up after a failure is ``lifecycle.py``'s, with KV parking's two
steps (``parking.py``): restore between "runtime ready" and Ready, park between "drained" and the stop.

Nothing here blocks the event loop: process starts and stops, file reads and the state.json writes
(``persist.py``) run in worker threads, and the monitor (``monitor.py``) only looks; stops, probes and clean-ups it
decides on run as tasks of their own (``tasks.py``). Spec changes restart only what changed (``spec_changes.py``);
a new daemon adopts or stops what the last one left running (``reattach.py``); ``records.py`` is how an instance
looks in state.json and the admin API's status.

Residency: ``single`` keeps one model loaded; ``memory`` keeps several while their estimates fit the budget,
evicting the least recently used first. ``pinned`` models are never evicted; ``disabled`` ones never start. Which
models a start stops and whether it then fits the machine is one plan (``residency.py``), which the memory guard
(``memory_guard.py``) judges: the guard never counts on an eviction that will not be made.

Stops can fail (a service manager times out): the runtime keeps its handle, is recorded ``StopFailed`` and its
stop is retried (``stopping.py``), so no job is left running unrecorded. Deleted models are forgotten once stopped.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import aiohttp

from athanor.controller import failures, memory_guard, records, residency
from athanor.controller.changes import Changes
from athanor.controller.deaths import DeathWatch
from athanor.controller.desired import DesiredState
from athanor.controller.events import Event, EventLog
from athanor.controller.gate import SwapGate
from athanor.controller.health import HealthChecks
from athanor.controller.instance import RUNNING, Instance, Observer, Phase
from athanor.controller.lease import Lease
from athanor.controller.lifecycle import Lifecycle
from athanor.controller.monitor import Monitor
from athanor.controller.persist import StateWriter
from athanor.controller.preflight import LaunchMemo, prepare_launch, unservable
from athanor.controller.reattach import reattach_all
from athanor.controller.records import job_of, pid_of
from athanor.controller.spec_changes import SpecChanges
from athanor.controller.stopping import exit_text
from athanor.controller.tasks import OwnedTasks
from athanor.errors import AthanorError, ModelUnavailable, QueueFull, StoreError
from athanor.fit import Memory, machine_memory
from athanor.managers import Managers
from athanor.managers.base import Handle, ServiceManager
from athanor.parking import files as park_files
from athanor.quantities import parse_duration
from athanor.runtimes import secret as runtime_secret
from athanor.runtimes.launch import LaunchSpec
from athanor.store import Store

__all__ = ["Controller", "exit_text", "stop_left_behind"]

log = logging.getLogger("athanor.controller")

DRAIN_TIMEOUT_S: Final = 30.0
_READY: Final = Phase.READY  # compiled, a C static: an attribute of the (Python) enum costs 70 ns per look


class Controller:
    """The one owner of the instances and the only one that starts and stops their runtimes. Its collaborators
    (desired state, death checks, health checks, spec changes, the monitor, re-attach) are handed what they need
    and report back through the methods below; none of them imports this module."""

    def __init__(self, store: Store, managers: Managers, session: aiohttp.ClientSession):
        self.store = store
        self.managers = managers
        self.session = session
        self.instances: dict[str, Instance] = {}
        self._gate = SwapGate(lambda name: name in self.instances and self.serving(self.instances[name]))
        self._writer = StateWriter(store)
        self.events = EventLog()  # what happened, in order: state.json, metrics and the admin API's stream read it
        self.events.listen(self._writer.event)
        self.changes = Changes()  # bumped by every phase, count and event: the admin API's status feed follows it
        self.events.listen(lambda _event: self.changes.bump())
        self._desired = DesiredState(store, self.events.emit)
        self._observers: list[Observer] = [self._phase_changed]
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._tasks = OwnedTasks()
        self._spawn = self._tasks.spawn
        self._deaths = DeathWatch(self._spawn, self.manager_of, self.crashed)
        self._hurry = asyncio.Event()  # set at shutdown: drains end at once
        self._life = Lifecycle(managers, store.home, store.logs_dir, session, self._desired, self._save,
                               self.events.emit, self._spawn, self._hurry)
        self._health = HealthChecks(session, lambda: self._desired.gateway, self.model, self._spawn,
                                    self._life.fail)
        self._specs = SpecChanges(lambda: self._desired.doc, self._save, self.events.emit, self.stop,
                                  self.make_ready, self.stopping, self._spawn, store.home)
        self.watcher = Monitor(self, self._deaths, self._health, self._specs, self._spawn)
        self._closing = False  # set at shutdown: nothing new starts
        self.orphans_stopped: dict[str, int | None] = {}  # runtimes re-attach found running and stopped
        self._monitor: asyncio.Task[None] | None = None  # the watcher's loop
        self.machine_memory: Callable[[], Memory] = machine_memory  # what residency plans with (tests inject it)
        self._launches = LaunchMemo()  # each model's launch, worked out again only when what it came from changed
        self._estimates = residency.Estimates()  # each model's memory estimate under the current document

    # ------------------------------------------------------------------ desired state

    def doc(self) -> dict[str, Any]:
        """models.json, re-read when it changed on disk (``desired.py``): ``apply`` reaches a running daemon this
        way, at once. A document that does not parse is reported once and the last good one keeps serving."""
        return self._desired.refresh()

    @property
    def store_problem(self) -> str | None:
        """Why models.json cannot be read now (None: it can); serving goes on from the last good version."""
        return self._desired.problem

    def gateway(self, *, refresh: bool = True) -> dict[str, Any]:
        """The Gateway spec. ``refresh=False``: the caller looked at the desired state for this request already
        (the front door does, for the body limit, as a request's headers arrive)."""
        if refresh:
            self._desired.refresh()  # ``doc()``
        return self._desired.gateway

    def setting(self, obj: dict[str, Any] | None, key: str) -> Any:
        """A model's own ``spec.<key>``, else the Gateway's (startupTimeout, idleTimeout)."""
        return self._desired.setting(obj, key)

    def idle_limit(self, inst: Instance, obj: dict[str, Any]) -> float | None:
        """Seconds a loaded model stays after its last request; None: for ever. An Ollama client's ``keep_alive``
        (held until the model unloads) comes first; a pinned model stays; else the spec's idleTimeout."""
        if inst.keep_alive is not None:
            return None if math.isinf(inst.keep_alive) else inst.keep_alive
        if obj["spec"].get("residency") == "pinned":
            return None
        return parse_duration(self.setting(obj, "idleTimeout")) or None  # 0: no limit

    def resolve(self, requested: str, *, refresh: bool = True) -> str | None:
        """A model's name from its name, an alias, or its discovered id (``org/repo`` or ``org/repo:file``).
        ``refresh=False``: the caller read the desired state for this request already (``doc``, ``gateway``)."""
        return self._desired.resolve(requested, refresh=refresh)

    def model(self, name: str) -> dict[str, Any] | None:
        """The stored object of a resolved model."""
        return self._desired.doc["models"].get(name)

    def outdated(self, inst: Instance) -> bool:
        """Started from an older generation of its spec (a re-attached instance of unknown generation is not).

        Reads the document as last loaded: every request resolves its model first, which re-reads it if changed.
        """
        models: dict[str, Any] = self._desired.doc["models"]  # typed: a dict's ``get``, not a generic method call
        obj = models.get(inst.name)
        if not obj or not inst.generation:
            return False
        metadata: dict[str, Any] = obj["metadata"]
        return metadata.get("generation", 1) != inst.generation

    def serving(self, inst: Instance) -> bool:
        """A request for this instance can go straight to its runtime: ready and started from the current spec."""
        return inst.phase is _READY and not self.outdated(inst)

    def instance(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst is None:
            inst = self.instances[name] = Instance(name, changes=self.changes)
            for observer in self._observers:
                inst.subscribe(observer)
            self.changes.bump()
        return inst

    def subscribe(self, observer: Observer) -> None:
        """``observer(instance, old, new)`` on every phase change of every instance, present and future."""
        self._observers.append(observer)
        for inst in self.instances.values():
            inst.subscribe(observer)

    # ------------------------------------------------------------------ the one entry point

    def use(self, name: str) -> Lease:
        """Admit one request for the resolved model ``name``, or refuse it now, before any response has started:
        ModelUnavailable when it cannot run, QueueFull when too many requests already wait for it."""
        inst = self.instance(name)
        serving = self.serving(inst)
        if not serving:
            problem = self._unservable(inst)
            if problem:
                raise ModelUnavailable(problem)
            limit = self._desired.gateway["limits"]["maxQueue"]
            if inst.waiting >= limit:
                raise QueueFull(f"{inst.waiting} requests already wait for model {name!r} (limits.maxQueue {limit})")
        return Lease(self, inst, waiting=not serving)

    def use_now(self, name: str) -> Lease | None:
        """``use`` for a request that can go to the runtime now: a lease counted in flight on the runtime that
        serves the resolved model ``name``, or None (nothing counted) when it does not serve right now, and the
        caller takes ``use``'s way instead (the fast path, ``proxy.Proxy.fast``)."""
        inst = self.instances.get(name)
        if inst is None or not self.serving(inst):
            return None
        return Lease.in_flight(self, inst)

    async def make_ready(self, inst: Instance) -> None:
        """Wait in the swap gate, then until the model serves: share the start under way, or start it (making
        room first). Raises ModelUnavailable when it cannot be served."""
        async with self._gate.hold(inst.name):
            await self._make_ready(inst)

    async def _make_ready(self, inst: Instance) -> None:
        name = inst.name
        while True:
            self.doc()  # it may have changed while this request waited
            if self.serving(inst):
                return
            if inst.phase is Phase.READY:  # its spec changed since it started
                if not await self._specs.follow(inst):
                    await self.stop(name)  # ... and what it runs with it: drain, then start it anew
                continue
            if inst.phase in (Phase.DRAINING, Phase.STOPPING):
                await inst.changed.wait()
                continue
            if inst.phase is Phase.STARTING:  # a start this request did not make (its maker left): share it
                assert inst.start_task is not None
                await asyncio.wait({inst.start_task})
                if self._start_failed(inst):
                    raise ModelUnavailable(f"model {name!r} failed to start: {inst.message}")
                continue
            problem = self._unservable(inst)
            if problem:
                raise ModelUnavailable(problem)
            obj = self._desired.doc["models"][name]
            if inst.cleanup_task is not None and not inst.cleanup_task.done():
                await asyncio.wait({inst.cleanup_task})  # the failed process must be gone before its port is reused
                continue
            delay = failures.backoff(inst)
            if delay > 0:
                await asyncio.sleep(delay)  # restart backoff: 0.5 s, 1 s, 2 s ... after a failure
                continue
            launch, evict, beside = await self._prepare_start(inst, obj)
            if not beside:
                await self._make_room(name, evict)
            if (inst.phase not in (Phase.STANDBY, Phase.FAILED)
                    or self._desired.doc["models"].get(name) is not obj or self._closing):
                continue  # something changed while room was made: look again

            def spawned() -> None:  # room made beside the start, once it is under way
                if beside:
                    self._spawn(self._make_room(name, evict), f"make-room-for-{name}")

            inst.start_task = self._spawn(self._life.start(inst, obj, launch, spawned), f"start-{name}")
            await asyncio.wait({inst.start_task})
            if self._start_failed(inst):
                raise ModelUnavailable(f"model {name!r} failed to start: {inst.message}")

    # ------------------------------------------------------------------ starting and stopping

    def _unservable(self, inst: Instance) -> str | None:
        """Why ``inst`` cannot be started now, from what is known without touching the disk (None: it can be)."""
        if self._closing:
            return "the gateway is shutting down"
        return (unservable(self._desired.doc["models"].get(inst.name), inst.name) or failures.crash_loop(inst)
                or failures.unstoppable(inst))

    def current_manager(self) -> ServiceManager:
        """The manager new starts go to (the Gateway's serviceManager)."""
        return self.managers.current(self._desired.gateway)

    def manager_of(self, handle: Handle) -> ServiceManager:
        """The service manager that runs the job of ``handle``."""
        return self._life.manager_of(handle)

    @property
    def stop_retry_delays(self) -> tuple[float, ...]:
        """Between the attempts of a failed stop (tests shorten them)."""
        return self._life.stop_retry_delays

    @stop_retry_delays.setter
    def stop_retry_delays(self, delays: tuple[float, ...]) -> None:
        self._life.stop_retry_delays = delays

    async def runtime_died(self, inst: Instance, incarnation: int) -> bool:
        """A request says the runtime of ``incarnation`` failed it. True when that runtime is gone (replaced, or
        dead now, in which case its crash is recorded unless already recorded). Every request that asks about
        one incarnation shares one look at it (``deaths.py``)."""
        return await self._deaths.runtime_died(inst, incarnation)

    def runtime_errored(self, inst: Instance, incarnation: int, status: int) -> None:
        """A request got a server error from runtime ``incarnation``: a run of them makes the controller test it
        with a generation of its own, and restart it like a crashed one if that fails too (``health.py``)."""
        self._health.runtime_errored(inst, incarnation, status)

    def crashed(self, inst: Instance, incarnation: int, exit_code: int | None) -> None:
        """Record the death of runtime ``incarnation``: once, however many requests and monitor rounds see it."""
        if inst.incarnation != incarnation or inst.phase not in (Phase.READY, Phase.DRAINING):
            return
        self._life.fail(inst, exit_text(exit_code), "Crashed", exit_code)

    def _refused(self, inst: Instance, reason: str, kind: str = "StartRefused") -> None:
        """A start refused before anything was stopped: an event (once per distinct reason), not a failure."""
        if inst.message != reason:
            inst.message = reason
            inst.refusal = failures.refusal(kind, reason)
            self._save(inst)
            self._event("Model", inst.name, "Warning", kind, reason)

    async def stop(self, name: str, *, drain: bool = True) -> None:
        """Stop ``name``'s runtime, letting requests in flight finish first unless ``drain`` is False. Concurrent
        stops of one model share one; a caller that goes away does not interrupt it."""
        task = self._stops.get(name)
        if task is None or task.done():
            task = self._stops[name] = self._spawn(self._stop(name, drain), f"stop-{name}")
            task.add_done_callback(lambda done: self._stops.pop(name) if self._stops.get(name) is done else None)
        await asyncio.wait({task})

    async def _stop(self, name: str, drain: bool) -> None:
        inst = self.instances.get(name)
        halted = False  # one stop asks its manager once more after a clean-up gave up, not for ever
        while inst is not None:
            if inst.phase is Phase.STARTING:
                inst.abort.set()
                assert inst.start_task is not None
                await asyncio.wait({inst.start_task})
            elif inst.phase is Phase.READY:
                inst.move(Phase.DRAINING, "draining requests in flight before stopping")
            elif inst.phase is Phase.DRAINING:
                if drain and inst.inflight:
                    await self._drained(inst)
                if inst.phase is Phase.DRAINING:  # unless it died while draining
                    await self._life.parking.park(inst)
                if inst.phase is Phase.DRAINING:  # unless it died while draining or parking
                    halted = True
                    await self._life.halt(inst, "stopping")
            elif inst.phase is Phase.FAILED:
                if inst.cleanup_task is not None:
                    await asyncio.wait({inst.cleanup_task})
                if inst.phase is Phase.FAILED:
                    if halted and inst.handle is not None:
                        return  # its stop and the retries failed: Failed (StopFailed), handle kept
                    halted = True
                    await self._life.halt(inst, "clearing the failure")
            elif inst.phase is Phase.STOPPING:
                await inst.changed.wait()
            else:
                return

    async def _drained(self, inst: Instance) -> None:
        idle = asyncio.ensure_future(inst.until_idle())
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({idle, hurry}, timeout=DRAIN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        hurry.cancel()

    async def start(self, name: str, *, force: bool = False) -> None:
        """``athanor start``: serve ``name`` now, through the same gate as requests. ``force``: even if the
        memory guard says it does not fit (this start only)."""
        inst = self.instance(name)
        inst.force_next = force
        try:
            await self.make_ready(inst)
        finally:
            inst.force_next = False

    async def restart(self, name: str) -> None:
        inst = self.instance(name)
        inst.failures.clear()
        await self.stop(name)
        await self.make_ready(inst)

    async def stop_all(self) -> None:
        """Stop every runtime, at once (shutdown): nothing new starts from here on, and the starts under way are
        aborted."""
        self._closing = True
        self._hurry.set()
        for _ in range(3):  # a start may still be ending when the first round looks; a stop that fails is logged
            running = [name for name, inst in self.instances.items() if inst.phase is not Phase.STANDBY]
            if not running:
                return
            await asyncio.gather(*(self.stop(name, drain=False) for name in running))
        log.error("still not stopped at shutdown: %s", ", ".join(
            name for name, inst in self.instances.items() if inst.phase is not Phase.STANDBY))

    # ------------------------------------------------------------------ residency

    @staticmethod
    def _start_failed(inst: Instance) -> bool:
        """The start just made failed for good. A start that failed restoring a parked slot is tried again at
        once: the file is gone, so the next one prefills (``lifecycle.py``)."""
        return inst.phase is Phase.FAILED and (inst.last_failure or {}).get("reason") != "RestoreFailed"

    async def _prepare_start(self, inst: Instance, obj: dict[str, Any]) -> tuple[LaunchSpec, list[Instance], bool]:
        """Everything a start needs before its process, in one worker thread: the preflight (``preflight.py``),
        the room plan (what it stops, whether it then fits, whether it fits beside them while they stop:
        ``residency.py``, judged by ``memory_guard.py`` unless the spec or ``athanor start --force`` allows
        overcommitting), the start's runtime secret and its park directory. Raises
        ModelUnavailable (and records the refusal) when the start cannot go ahead; nothing is stopped then."""
        doc, gateway, home = self._desired.doc, self._desired.gateway, self.store.home
        models = doc["models"]
        residents = [(i.name, i.last_used, models.get(i.name, {}).get("spec", {}).get("residency") != "pinned")
                     for i in self.instances.values() if i.name != inst.name and i.phase in RUNNING]
        overcommit = inst.force_next or memory_guard.overcommit_allowed(gateway, obj)
        manager = self.managers.current(gateway)
        budget = manager.memory()  # a cluster's, read here on the loop that keeps it; None: this machine's
        spare = await self._life.spare_secret(inst.name)

        def prepare() -> tuple[LaunchSpec, residency.RoomPlan, str | None]:  # the disk, vm_stat, fsyncs: off the loop
            launch = prepare_launch(doc, obj, home, local=manager.local, memo=self._launches)
            memory = budget or self.machine_memory()
            room, estimate = residency.plan_start(doc, obj, residents, gateway["residency"], memory, self._estimates)
            problem = None if overcommit else memory_guard.refusal(inst.name, estimate, room)
            if problem:
                return launch, room, problem
            if not manager.local:
                try:
                    return manager.prepared(launch), room, None
                except AthanorError as refused:  # compiled, a name keeps the type it was first bound to
                    raise ModelUnavailable(f"model {inst.name!r}: {refused}") from refused
            try:
                if launch.park_dir:  # llama-server refuses a --slot-save-path that is not a directory yet
                    park_files.prepare(Path(launch.park_dir))
                return manager.prepared(runtime_secret.issued(launch, spare)), room, None
            except StoreError as unreadable:
                raise ModelUnavailable(f"model {inst.name!r}: {unreadable}") from unreadable
            except OSError as failed:
                raise ModelUnavailable(f"model {inst.name!r}: cannot make its park directory {launch.park_dir}: "
                                       f"{failed.strerror or failed}") from failed

        try:
            launch, room, problem = await asyncio.to_thread(prepare)
        except ModelUnavailable as exc:
            self._refused(inst, str(exc))
            raise
        if problem:
            self._refused(inst, problem, "InsufficientMemory")
            raise ModelUnavailable(problem)
        return launch, [self.instances[name] for name in room.evict if name in self.instances], room.fits_beside

    async def _make_room(self, name: str, evict: list[Instance]) -> None:
        """Stop what must go for ``name``: before it starts (the caller holds the swap gate), or, when the machine
        holds both, as soon as its process runs, so their drains, parking and exits overlap its load."""
        if not evict:
            return
        names = ", ".join(i.name for i in evict)
        policy = self._desired.gateway["residency"]["policy"]
        self._event("Model", name, "Normal", "Swapping", f"stopping {names} to make room (residency {policy})",
                    evicted=[i.name for i in evict])
        for victim in evict:
            self._event("Model", victim.name, "Normal", "Evicted", f"stopped to make room for {name}", by=name)
        await asyncio.gather(*(self.stop(victim.name) for victim in evict))

    # ------------------------------------------------------------------ observed state

    def _phase_changed(self, inst: Instance, old: Phase, new: Phase) -> None:
        self._save(inst)
        extra: dict[str, Any] = {"phase": new.value, "previous": old.value, "incarnation": inst.incarnation}
        reason = new.value
        if new is Phase.READY and inst.load_seconds is not None:
            extra["loadSeconds"] = round(inst.load_seconds, 3)
        if new is Phase.FAILED and inst.last_failure:
            reason = inst.last_failure["reason"]  # Crashed, Hung, Unhealthy, StartFailed, StopFailed, RestoreFailed
            extra["exitCode"] = inst.last_failure.get("exitCode")
        self._event("Model", inst.name, "Warning" if new is Phase.FAILED else "Normal", reason,
                    f"{old.value} -> {new.value}: {inst.message}", **extra)

    def _save(self, inst: Instance) -> None:
        """Queue the instance's record for state.json (written off the loop, newest wins)."""
        self._writer.record(inst.name, self.record(inst))

    @staticmethod
    def record(inst: Instance) -> dict[str, Any]:
        """The instance as state.json keeps it (and as ``views.model_view`` reads it)."""
        return records.record(inst)

    def _event(self, kind: str, name: str, type_: str, reason: str, message: str, **extra: Any) -> Event:
        return self.events.emit(kind, name, type_, reason, message, **extra)

    async def recorded(self, timeout: float = 5.0) -> bool:
        """Wait until state.json holds every change made so far (the CLI reads it after a command)."""
        return await self._writer.settled(timeout)

    def status(self) -> dict[str, Any]:
        """What the admin API reports: every instance's phase and load, and a store problem if there is one."""
        instances = {name: records.status_line(inst) for name, inst in self.instances.items()}
        held = self.events.since()
        return {"instances": instances, "storeProblem": self.store_problem,
                "lastEvent": held[-1]["seq"] if held else None}

    # ------------------------------------------------------------------ re-attach at daemon start

    async def reattach(self) -> list[str]:
        """Adopt runtimes a previous daemon left running and healthy; stop the others that still run (their model
        was deleted, they were being stopped or had failed, or their manager restarted them since), so none is
        left running untracked (``reattach.py``). Returns the names adopted."""
        return await reattach_all(self, self._writer)

    def adopt(self, name: str, handle: Handle, launch: LaunchSpec, generation: int) -> None:
        """Track a runtime a previous daemon left running and healthy: Ready, at once."""
        inst = self.instance(name)
        inst.handle, inst.launch, inst.generation = handle, launch, generation
        inst.move(Phase.STARTING, f"re-attaching to {job_of(handle)}")
        inst.move(Phase.READY, f"re-attached to {job_of(handle)}")

    def adopt_unstopped(self, name: str, handle: Handle, launch: LaunchSpec, generation: int,
                        error: Exception) -> None:
        """A runtime a previous daemon left, which its manager could not check or stop: tracked like any stop
        that failed (Failed, StopFailed, its handle kept and the stop retried), never dropped."""
        inst = self.instance(name)
        inst.handle, inst.launch, inst.generation = handle, launch, generation
        inst.move(Phase.STARTING, f"re-attaching to {job_of(handle)}")
        inst.move(Phase.STOPPING, f"stopping {job_of(handle)}, left running by the previous daemon")
        self._life.stop_failed(inst, handle, error)

    # ------------------------------------------------------------------ background duties

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self.watcher.watch(), name="controller-monitor")

    async def close(self) -> None:
        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        await self.stop_all()
        self._health.cancel()
        await self._tasks.wait()
        await self._writer.close()
        await self.managers.close()
        self._desired.close()

    def stopping(self, name: str) -> bool:
        """Whether a stop of ``name`` is under way."""
        return name in self._stops

    def settled(self, inst: Instance) -> bool:
        """Nothing runs, waits or is under way for ``inst``: no process (a failed stop keeps its handle), no
        request, no task of the controller's."""
        tasks = [inst.start_task, inst.cleanup_task, self._stops.get(inst.name)]
        return (inst.phase in (Phase.STANDBY, Phase.FAILED) and inst.handle is None and not inst.inflight
                and not inst.waiting and not self._specs.reloading(inst.name)
                and all(task is None or task.done() for task in tasks)
                and not self._deaths.looking_at(inst.name))

    def forget(self, inst: Instance) -> None:
        """Drop the instance of a deleted model once it is stopped (``settled``): from /status, the metrics gauges
        and state.json, so deleted models do not pile up in a long-running gateway."""
        log.info("%s was deleted and is stopped: forgetting it", inst.name)
        del self.instances[inst.name]
        self._health.forget(inst.name)
        self._writer.forget(inst.name)
        self._spawn(asyncio.to_thread(park_files.clear, self.store.home, inst.name), f"unpark-{inst.name}")
        self._event("Model", inst.name, "Normal", "Forgotten", "deleted and stopped: no longer tracked")


async def stop_left_behind(store: Store) -> dict[str, int | None]:
    """``athanor down`` without a gateway: stop the runtimes a dead one left, through the same state machine and
    records (adopted and then stopped, or stopped at once when not adoptable). Returns {model: pid} of those that
    were still running. Raises AthanorError naming those that could not be stopped: their handles stay recorded."""
    from athanor.controller.readiness import probe_session

    async with probe_session() as session:
        controller = Controller(store, Managers(store.home), session)
        await controller.reattach()
        tracked = {name: pid_of(inst.handle) for name, inst in controller.instances.items() if inst.handle}
        await controller.close()
    left = {name: inst for name, inst in controller.instances.items() if inst.handle is not None}
    if left:  # their handles stay in state.json: the next 'athanor down' tries again
        raise AthanorError("could not stop " + "; ".join(
            f"model/{name} ({job_of(inst.handle)}): {(inst.last_failure or {}).get('message', inst.message)}"
            for name, inst in sorted(left.items())) + " ('athanor down' tries again)")
    return {**controller.orphans_stopped, **tracked}
