"""The controller: desired state from the store, instances in memory, jobs through a service manager.

The ingress asks for exactly one thing: ``controller.use(name)``, a lease (``lease.py``) that admits or refuses the
request at once, then yields the runtime to send it to. Behind it the controller decides whether that means
nothing (ready), waiting (a start is under way: everyone shares it), starting, or swapping.

Swap policy (anti-thrash). Requests for a model that is serving (ready, spec unchanged) go straight to it, whatever
else is loading: under ``memory`` residency one model keeps answering while another loads. Every other request
enters the swap gate (``gate.py``). A swap moves the models it stops to ``Draining``: their requests already in
flight finish first (bounded by ``DRAIN_TIMEOUT_S``), new ones queue in the gate, then the old model stops and
the new one starts. Whenever the gate passes on, waiters whose model is serving go ahead of waiters that need a
swap (bounded by ``MAX_JUMPS``), so clients alternating between models are served in batches, one swap per batch.

What can fail early fails before anything is evicted (``preflight.py``): a model that cannot start never costs
the loaded one its place.

Failures. A start that fails, a runtime that dies and a runtime that stops answering its liveness probe each
record one failure against that runtime's incarnation (``instance.py``), however many requests noticed it; the
next request restarts it after a short backoff, and ``CRASH_LIMIT`` failures in ``CRASH_WINDOW_S`` leave it
``Failed`` until ``athanor restart``.

Nothing here blocks the event loop: process starts and stops, file reads and the state.json writes
(``persist.py``) run in worker threads, and the monitor only looks; stops, probes and clean-ups it decides on run
as tasks of their own.

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
import os
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import Any

import aiohttp

from athanor import actions, catalog
from athanor.controller import memory_guard, residency
from athanor.controller.events import Event, EventLog
from athanor.controller.gate import SwapGate
from athanor.controller.instance import RUNNING, Instance, Observer, Phase
from athanor.controller.lease import Lease
from athanor.controller.persist import StateWriter
from athanor.controller.preflight import prepare_launch, unservable
from athanor.controller.readiness import (
    NotReady,
    StartAborted,
    answers,
    generates,
    probe_once,
    wait_ready,
)
from athanor.controller.stopping import STOP_RETRY_DELAYS_S, StopFailed, exit_text, stop_retrying
from athanor.errors import AthanorError, ModelUnavailable, QueueFull, StoreError
from athanor.fit import Memory, machine_memory
from athanor.managers import Managers, jobs, logs
from athanor.managers.base import Handle, JobState, ServiceManager
from athanor.runtimes import secret as runtime_secret
from athanor.runtimes.launch import LLAMA_AUTO_PARALLEL, MLX_MAX_CONNECTIONS, LaunchSpec
from athanor.store import Store
from athanor.units import parse_duration

__all__ = ["Controller", "exit_text", "stop_left_behind"]

log = logging.getLogger("athanor.controller")

CRASH_WINDOW_S = 120.0
CRASH_LIMIT = 3
DRAIN_TIMEOUT_S = 30.0
MONITOR_INTERVAL_S = 0.5
HOUSEKEEPING_INTERVAL_S = 2.0  # reaping exited children and rotating logs
DRIFT_INTERVAL_S = 5.0  # comparing what loaded models run with what their spec says now
EXIT_GRACE_S = 2.0  # how long a broken connection waits for its runtime's death to show (it closes sockets first)
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL for a failed runtime
STOP_TIMEOUT_S = 10.0  # ... and for one that is stopped on purpose
HUNG_GRACE_S = 1.0  # ... and for a frozen one, which cannot act on SIGTERM anyway


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Controller:
    def __init__(self, store: Store, managers: Managers, session: aiohttp.ClientSession):
        self.store = store
        self.managers = managers
        self.session = session
        self.instances: dict[str, Instance] = {}
        self.store_problem: str | None = None  # models.json is unreadable: serving goes on from the last good one
        self._gate = SwapGate(lambda name: name in self.instances and self.serving(self.instances[name]))
        self._doc: dict[str, Any] = {"models": {}, "recipes": {}, "gateway": None, "ignoredSources": []}
        self._gateway = catalog.gateway_spec(self._doc)
        self._doc_stamp: object = None
        self._names: dict[str, str] = {}
        self._writer = StateWriter(store)
        self.events = EventLog()  # what happened, in order: state.json, metrics and the admin API's stream read it
        self.events.listen(self._writer.event)
        self._observers: list[Observer] = [self._phase_changed]
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._reloading: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._death_checks: dict[tuple[str, int], asyncio.Task[bool]] = {}
        self._next_probe: dict[str, float] = {}
        self._next_housekeeping = 0.0
        self._housekeeper: asyncio.Task[None] | None = None
        self._next_drift_check = time.monotonic() + DRIFT_INTERVAL_S
        self._drift_checker: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()  # set at shutdown: drains end at once
        self._closing = False  # set at shutdown: nothing new starts
        self.orphans_stopped: dict[str, int | None] = {}  # runtimes re-attach found running and stopped
        self._monitor: asyncio.Task[None] | None = None
        self.machine_memory: Callable[[], Memory] = machine_memory  # what residency plans with (tests inject it)
        self.stop_retry_delays: tuple[float, ...] = STOP_RETRY_DELAYS_S  # between the attempts of a failed stop

    # ------------------------------------------------------------------ desired state

    def doc(self) -> dict[str, Any]:
        """models.json, re-read when it changed on disk: ``apply`` reaches a running daemon this way, at once.

        One stat per call (about a microsecond); the parse, the name index and the gateway spec are redone only
        on a change. A document that does not parse is reported once and the last good one keeps serving.
        """
        try:
            st = os.stat(self.store.models.path)
            stamp: object = (st.st_ino, st.st_mtime_ns, st.st_size)  # every atomic write is a new inode
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            stamp = str(exc)
        if stamp != self._doc_stamp:
            self._doc_stamp = stamp
            try:
                doc = self.store.models.load()
            except StoreError as exc:
                self._store_broken(str(exc))
            else:
                self._doc, self._names, self._gateway = doc, self._index(doc["models"]), catalog.gateway_spec(doc)
                if self.store_problem is not None:
                    self._store_recovered()
        return self._doc

    def _store_broken(self, problem: str) -> None:
        log.error("%s; serving from the last good version", problem)
        self.store_problem = problem
        self._event("Store", "models.json", "Warning", "StoreUnreadable",
                    f"{problem}; the gateway serves from the last good version")

    def _store_recovered(self) -> None:
        log.info("models.json is readable again")
        self.store_problem = None
        self._event("Store", "models.json", "Normal", "StoreReadable", "models.json is readable again")

    @staticmethod
    def _index(models: dict[str, Any]) -> dict[str, str]:
        """Every name a client may use -> the model's name. Names win over aliases, aliases over HF ids."""
        names: dict[str, str] = {}
        for name, obj in models.items():
            hf = obj["spec"]["source"].get("hf")
            if hf:
                names[hf["repo"]] = name
                if hf.get("file"):
                    names[f"{hf['repo']}:{hf['file']}"] = name
        for name, obj in models.items():
            names.update((alias, name) for alias in obj["spec"].get("aliases", ()))
        names.update((name, name) for name in models)
        return names

    def gateway(self) -> dict[str, Any]:
        self.doc()
        return self._gateway

    def _setting(self, obj: dict[str, Any] | None, key: str) -> Any:
        """A model's own ``spec.<key>``, else the Gateway's (startupTimeout, idleTimeout)."""
        own = (obj or {}).get("spec", {}).get(key)
        return own if own is not None else self._gateway[key]

    def resolve(self, requested: str) -> str | None:
        """A model's name from its name, an alias, or its discovered id (``org/repo`` or ``org/repo:file``)."""
        self.doc()
        return self._names.get(requested)

    def model(self, name: str) -> dict[str, Any] | None:
        """The stored object of a resolved model."""
        return self._doc["models"].get(name)

    def _outdated(self, inst: Instance) -> bool:
        """Started from an older generation of its spec (a re-attached instance of unknown generation is not).

        Reads the document as last loaded: every request resolves its model first, which re-reads it if changed.
        """
        obj = self._doc["models"].get(inst.name)
        return bool(obj and inst.generation and obj["metadata"].get("generation", 1) != inst.generation)

    def serving(self, inst: Instance) -> bool:
        """A request for this instance can go straight to its runtime: ready and started from the current spec."""
        return inst.phase is Phase.READY and not self._outdated(inst)

    def instance(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst is None:
            inst = self.instances[name] = Instance(name)
            for observer in self._observers:
                inst.subscribe(observer)
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
            limit = self._gateway["limits"]["maxQueue"]
            if inst.waiting >= limit:
                raise QueueFull(f"{inst.waiting} requests already wait for model {name!r} (limits.maxQueue {limit})")
        return Lease(self, inst, waiting=not serving)

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
                if not await self._follow_spec(inst):
                    await self.stop(name)  # ... and what it runs with it: drain, then start it anew
                continue
            if inst.phase in (Phase.DRAINING, Phase.STOPPING):
                await inst.changed.wait()
                continue
            if inst.phase is Phase.STARTING:  # a start this request did not make (its maker left): share it
                assert inst.start_task is not None
                await asyncio.wait({inst.start_task})
                if inst.phase is Phase.FAILED:
                    raise ModelUnavailable(f"model {name!r} failed to start: {inst.message}")
                continue
            problem = self._unservable(inst)
            if problem:
                raise ModelUnavailable(problem)
            obj = self._doc["models"][name]
            if inst.cleanup_task is not None and not inst.cleanup_task.done():
                await asyncio.wait({inst.cleanup_task})  # the failed process must be gone before its port is reused
                continue
            delay = self._backoff(inst)
            if delay > 0:
                await asyncio.sleep(delay)  # restart backoff: 0.5 s, 1 s, 2 s ... after a failure
                continue
            try:
                launch = await asyncio.to_thread(prepare_launch, self._doc, obj)
            except ModelUnavailable as exc:
                self._refused(inst, str(exc))
                raise
            evict, problem = await self._plan_room(inst, obj)
            if problem:
                self._refused(inst, problem, "InsufficientMemory")
                raise ModelUnavailable(problem)
            await self._make_room(name, evict)
            if (inst.phase not in (Phase.STANDBY, Phase.FAILED) or self._doc["models"].get(name) is not obj
                    or self._closing):
                continue  # something changed while room was made: look again
            inst.start_task = self._spawn(self._start(inst, obj, launch), f"start-{name}")
            await asyncio.wait({inst.start_task})
            if inst.phase is Phase.FAILED:
                raise ModelUnavailable(f"model {name!r} failed to start: {inst.message}")

    # ------------------------------------------------------------------ starting and stopping

    async def _start(self, inst: Instance, obj: dict[str, Any], launch: LaunchSpec) -> None:
        """Start one runtime and wait for it; ends Ready, Failed (process gone), or Standby when a stop aborted it.
        Never raises: every outcome is a phase."""
        inst.launch = launch
        inst.generation = obj["metadata"].get("generation", 1)
        inst.move(Phase.STARTING, "starting")
        try:
            launch = inst.launch = await asyncio.to_thread(runtime_secret.issued, launch)  # before the job reads it
            manager = self.managers.current(self._gateway)
            inst.handle = await manager.start(jobs.model_job(inst.name, launch, self.store.home))
            self._save(inst)
            timeout = parse_duration(self._setting(obj, "startupTimeout")) or 3600.0
            waited = await wait_ready(self.session, launch, timeout=timeout, alive=lambda: self._alive(inst),
                                      abort=inst.abort)
        except StartAborted:
            await self._halt(inst, "start aborted by a stop")
            return
        except (NotReady, AthanorError) as exc:
            self._fail(inst, str(exc), "StartFailed")
        except Exception as exc:  # noqa: BLE001 - any surprise must end in a phase, never leave it Starting
            log.exception("%s: unexpected error while starting", inst.name)
            self._fail(inst, f"unexpected error while starting: {exc!r}", "StartFailed")
        else:
            log.info("%s ready in %.2f s (pid %s)", inst.name, waited, _pid(inst.handle))
            inst.load_seconds = time.monotonic() - inst.starting_since
            inst.refusal = None
            inst.move(Phase.READY, f"ready in {waited:.2f} s")
            return
        if inst.cleanup_task is not None:
            await asyncio.wait({inst.cleanup_task})

    def _unservable(self, inst: Instance) -> str | None:
        """Why ``inst`` cannot be started now, from what is known without touching the disk (None: it can be)."""
        if self._closing:
            return "the gateway is shutting down"
        return (unservable(self._doc["models"].get(inst.name), inst.name) or self._crash_loop(inst)
                or self._unstoppable(inst))

    @staticmethod
    def _unstoppable(inst: Instance) -> str | None:
        """A failed runtime whose stop and its retries all failed may still hold the model's port and memory."""
        if inst.phase is not Phase.FAILED or inst.handle is None or inst.cleanup_task is None \
                or not inst.cleanup_task.done():
            return None
        failure = (inst.last_failure or {}).get("message", inst.message)
        return f"model {inst.name!r}: its runtime could not be stopped: {failure} ('athanor stop {inst.name}' retries)"

    def _manager(self, handle: Handle) -> ServiceManager:
        return self.managers.of(handle, self._gateway)

    async def _observe(self, inst: Instance) -> JobState | None:
        """What the instance's manager says about its job now (None: it has no job)."""
        handle = inst.handle
        return None if handle is None else await self._manager(handle).observe(handle)

    async def _alive(self, inst: Instance) -> bool:
        state = await self._observe(inst)
        return state is not None and state.running

    def _fail(self, inst: Instance, reason: str, kind: str, exit_code: int | None = None) -> None:
        """Record one failure and move to Failed at once (no await: nothing can slip in between); the process, if
        any is left, is stopped by a clean-up task that a new start waits for."""
        now = time.time()
        inst.failures = [t for t in inst.failures if now - t < CRASH_WINDOW_S] + [now]
        handle = inst.handle
        inst.last_failure = {"reason": kind, "message": reason, "time": _iso(now), "exitCode": exit_code,
                             "logTail": []}
        log.warning("%s: %s: %s", inst.name, kind, reason)
        inst.move(Phase.FAILED, reason)
        if handle is not None:
            grace = HUNG_GRACE_S if kind == "Hung" else STOP_GRACE_S
            inst.cleanup_task = self._spawn(self._clean_up(inst, handle, inst.last_failure, grace),
                                            f"clean-up-{inst.name}")

    async def _clean_up(self, inst: Instance, handle: Handle, failure: dict[str, Any], grace: float) -> None:
        """Stop what is left of a failed runtime (retrying a stop that fails), then record its exit and log tail.
        A stop that keeps failing leaves the handle in place, so the job stays reachable (``StopFailed``)."""
        manager = self._manager(handle)
        try:
            code = await stop_retrying(manager, handle, grace, delays=self.stop_retry_delays, hurry=self._hurry,
                                       failed=lambda attempt, exc, delay: self._stop_attempt_failed(
                                           inst, handle, attempt, exc, delay))
        except StopFailed as exc:
            if failure["reason"] != "StopFailed":
                failure.update(reason="StopFailed", message=f"stopping pid {_pid(handle)} after {failure['reason']} "
                               f"failed: {exc.last}; its job may still run")
            self._save(inst)
            return
        tail = await asyncio.to_thread(logs.tail, self.store.logs_dir / f"{inst.name}.log", 20)
        manager.forget(handle)
        if inst.handle is handle:
            inst.handle = None
        if failure.get("exitCode") is None and code is not None:
            failure["exitCode"] = code  # a process killed a moment ago is collected only now
            if failure["reason"] == "Crashed":
                failure["message"] = exit_text(code)
        failure["logTail"] = tail
        if failure["reason"] == "StopFailed":
            self._event("Model", inst.name, "Normal", "Stopped", f"stopped pid {_pid(handle)} on a retry")
        self._save(inst)

    def _stop_attempt_failed(self, inst: Instance, handle: Handle, attempt: int, exc: Exception,
                             retry_in: float | None) -> None:
        then = f"retrying in {retry_in:g} s" if retry_in is not None else "giving up for now: the next stop retries"
        message = f"stopping pid {_pid(handle)} failed (attempt {attempt}): {exc}; {then}"
        log.warning("%s: %s", inst.name, message)
        self._event("Model", inst.name, "Warning", "StopFailed", message, attempt=attempt, pid=_pid(handle))

    def _stop_failed(self, inst: Instance, handle: Handle, error: BaseException | str) -> None:
        """A stop of a runtime failed: keep its handle (its job may still run), say so (Failed, StopFailed: the
        record keeps the handle, so ``athanor down`` still reaches it) and retry the stop in a clean-up task.
        Not a failure of the runtime: it does not count towards a crash loop."""
        message = f"stopping pid {_pid(handle)} failed: {error}; its job may still run (retrying the stop)"
        inst.last_failure = {"reason": "StopFailed", "message": message, "time": _iso(time.time()),
                             "exitCode": None, "logTail": []}
        log.warning("%s: %s", inst.name, message)
        inst.move(Phase.FAILED, message)
        inst.cleanup_task = self._spawn(self._clean_up(inst, handle, inst.last_failure, STOP_TIMEOUT_S),
                                        f"clean-up-{inst.name}")

    async def runtime_died(self, inst: Instance, incarnation: int) -> bool:
        """A request says the runtime of ``incarnation`` failed it. True when that runtime is gone (replaced, or
        dead now, in which case its crash is recorded here unless already recorded). Every request that asks
        about one incarnation shares one look at it: a crash with many requests in flight is one question to
        the manager, not one per request."""
        if inst.incarnation != incarnation or inst.phase not in (Phase.READY, Phase.DRAINING):
            return True
        return await asyncio.shield(self._death_check(inst, incarnation))

    def _death_check(self, inst: Instance, incarnation: int) -> asyncio.Task[bool]:
        """The one look at runtime ``incarnation`` that requests and the monitor share."""
        key = (inst.name, incarnation)
        check = self._death_checks.get(key)
        if check is None:
            check = self._death_checks[key] = self._spawn(self._check_death(inst, incarnation), f"death-{inst.name}")
            check.add_done_callback(lambda _: self._death_checks.pop(key, None))
        return check

    async def _check_death(self, inst: Instance, incarnation: int) -> bool:
        handle = inst.handle
        if handle is None:
            return True
        manager = self._manager(handle)
        state = await manager.observe(handle)
        if state.running:
            if not await manager.wait_exit(handle, EXIT_GRACE_S):
                return False  # still running: the failure was the connection's, not the runtime's
            state = await manager.observe(handle)
        code = state.exit_code
        if code is None and inst.incarnation == incarnation and inst.phase in (Phase.READY, Phase.DRAINING):
            code = await self._collect_exit(manager, handle)
        self._crashed(inst, incarnation, code)
        return True

    async def _collect_exit(self, manager: ServiceManager, handle: Handle) -> int | None:
        """The exit code of a runtime just seen dead, when its manager could not tell it yet: a process whose
        main thread has exited shows as a zombie while its other threads still exit, and only then can its exit
        status be collected. Stopping it, as its clean-up does anyway (a stop is safe on a dead job and when
        repeated), waits for that; a job that is not this daemon's child has no exit code to give (None)."""
        try:
            return await manager.stop(handle, STOP_GRACE_S)
        except Exception as exc:  # noqa: BLE001 - the crash is recorded without a code; the clean-up retries the stop
            log.warning("%s: cannot collect the exit code of pid %s: %s", handle.get("name"), _pid(handle), exc)
            return None

    def _crashed(self, inst: Instance, incarnation: int, exit_code: int | None) -> None:
        """Record the death of runtime ``incarnation``: once, however many requests and monitor rounds see it."""
        if inst.incarnation != incarnation or inst.phase not in (Phase.READY, Phase.DRAINING):
            return
        self._fail(inst, exit_text(exit_code), "Crashed", exit_code)

    def _refused(self, inst: Instance, reason: str, kind: str = "StartRefused") -> None:
        """A start refused before anything was stopped: an event (once per distinct reason), not a failure."""
        if inst.message != reason:
            inst.message = reason
            inst.refusal = {"reason": kind, "message": reason, "time": _iso(time.time())}
            self._save(inst)
            self._event("Model", inst.name, "Warning", kind, reason)

    @staticmethod
    def _backoff(inst: Instance) -> float:
        if inst.phase is not Phase.FAILED or not inst.failures:
            return 0.0
        delay = min(0.5 * 2 ** (len(inst.failures) - 1), 8.0)
        return max(0.0, inst.failures[-1] + delay - time.time())

    @staticmethod
    def _crash_loop(inst: Instance) -> str | None:
        if inst.phase is not Phase.FAILED:
            return None
        now = time.time()
        if len([t for t in inst.failures if now - t < CRASH_WINDOW_S]) < CRASH_LIMIT:
            return None
        return (f"model {inst.name!r} failed {CRASH_LIMIT} times in {CRASH_WINDOW_S:.0f} s: {inst.message} "
                f"(athanor restart {inst.name} retries)")

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
                    halted = True
                    await self._halt(inst, "stopping")
            elif inst.phase is Phase.FAILED:
                if inst.cleanup_task is not None:
                    await asyncio.wait({inst.cleanup_task})
                if inst.phase is Phase.FAILED:
                    if halted and inst.handle is not None:
                        return  # its stop and the retries failed: Failed (StopFailed), handle kept
                    halted = True
                    await self._halt(inst, "clearing the failure")
            elif inst.phase is Phase.STOPPING:
                await inst.changed.wait()
            else:
                return

    async def _drained(self, inst: Instance) -> None:
        idle = asyncio.ensure_future(inst.idle.wait())
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({idle, hurry}, timeout=DRAIN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        hurry.cancel()

    async def _halt(self, inst: Instance, message: str) -> None:
        """Stop the process and end in Standby, or in Failed (``StopFailed``, the handle kept, the stop retried)
        when it could not be stopped: a waiter must never find it Stopping for good, and a job that may still run
        must never lose its handle."""
        inst.move(Phase.STOPPING, message)
        handle = inst.handle
        error: BaseException | str = "the stop was interrupted"
        try:
            if handle is not None:
                manager = self._manager(handle)
                await manager.stop(handle, STOP_TIMEOUT_S)
                manager.forget(handle)
                inst.handle = None
        except Exception as exc:  # noqa: BLE001 - recorded; the phase must still settle
            error = exc
        finally:
            if inst.handle is None:
                inst.move(Phase.STANDBY, "stopped")
            else:
                self._stop_failed(inst, inst.handle, error)

    async def _follow_spec(self, inst: Instance) -> bool:
        """A ready model's spec changed: True when what it runs did not (an alias, a label, the idle limit), so
        the runtime keeps serving and now counts as started from the new generation. False: it must restart."""
        obj = self._doc["models"].get(inst.name)
        incarnation = inst.incarnation
        if obj is None or inst.launch is None:
            return False
        doc = self._doc
        launch = await asyncio.to_thread(actions.launch_for, doc, obj)  # looks for the runtime on disk
        if inst.incarnation != incarnation or inst.phase is not Phase.READY:
            return False
        generation = obj["metadata"].get("generation", 1)
        if launch != inst.launch:
            return False
        if inst.generation != generation:
            inst.generation = generation
            self._save(inst)
            self._event("Model", inst.name, "Normal", "SpecObserved",
                        f"generation {generation} applied: nothing the runtime runs changed, it keeps serving",
                        generation=generation)
        return True

    async def _reload(self, inst: Instance) -> None:
        """A loaded model whose spec changed is restarted from the new one at once (only that model's job), as
        ``apply`` promises, unless what it runs is unchanged; a failure is recorded like any other start's."""
        if inst.name in self._reloading:
            return
        self._reloading.add(inst.name)
        try:
            await self._reload_now(inst)
        finally:
            self._reloading.discard(inst.name)

    async def _reload_now(self, inst: Instance) -> None:
        if await self._follow_spec(inst):
            return
        obj = self._doc["models"].get(inst.name)
        if obj is not None:
            self._event("Model", inst.name, "Normal", "SpecChanged",
                        f"generation {obj['metadata'].get('generation', 1)} changes how it runs: restarting it "
                        "after its requests finish", generation=obj["metadata"].get("generation", 1))
        await self.stop(inst.name)
        try:
            await self.make_ready(inst)
        except ModelUnavailable as exc:
            log.warning("%s: reloading it failed: %s", inst.name, exc)

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

    async def _plan_room(self, inst: Instance, obj: dict[str, Any]) -> tuple[list[Instance], str | None]:
        """What a start of ``obj`` stops, and why it is refused for memory (None: it fits after those stops, or
        the spec or ``athanor start --force`` allows overcommitting): one plan (``residency.py``) decides both."""
        doc, gateway = self._doc, self._gateway
        models = doc["models"]
        residents = [(i.name, i.last_used, models.get(i.name, {}).get("spec", {}).get("residency") != "pinned")
                     for i in self.instances.values() if i.name != inst.name and i.phase in RUNNING]
        overcommit = inst.force_next or memory_guard.overcommit_allowed(gateway, obj)

        def plan() -> tuple[residency.RoomPlan, str | None]:  # reads the machine's memory (vm_stat): off the loop
            room, estimate = residency.plan_start(doc, obj, residents, gateway["residency"], self.machine_memory())
            return room, None if overcommit else memory_guard.refusal(inst.name, estimate, room)

        room, problem = await asyncio.to_thread(plan)
        if problem:
            return [], problem
        return [self.instances[name] for name in room.evict if name in self.instances], None

    async def _make_room(self, name: str, evict: list[Instance]) -> None:
        """Stop what must go before ``name`` starts (the caller holds the swap gate)."""
        if not evict:
            return
        names = ", ".join(i.name for i in evict)
        policy = self._gateway["residency"]["policy"]
        self._event("Model", name, "Normal", "Swapping", f"stopping {names} to make room (residency {policy})",
                    evicted=[i.name for i in evict])
        for victim in evict:
            self._event("Model", victim.name, "Normal", "Evicted", f"stopped to make room for {name}", by=name)
        await asyncio.gather(*(self.stop(i.name) for i in evict))

    # ------------------------------------------------------------------ observed state

    def _phase_changed(self, inst: Instance, old: Phase, new: Phase) -> None:
        self._save(inst)
        extra: dict[str, Any] = {"phase": new.value, "previous": old.value, "incarnation": inst.incarnation}
        reason = new.value
        if new is Phase.READY and inst.load_seconds is not None:
            extra["loadSeconds"] = round(inst.load_seconds, 3)
        if new is Phase.FAILED and inst.last_failure:
            reason = inst.last_failure["reason"]  # Crashed, Hung, Unhealthy, StartFailed, StopFailed
            extra["exitCode"] = inst.last_failure.get("exitCode")
        self._event("Model", inst.name, "Warning" if new is Phase.FAILED else "Normal", reason,
                    f"{old.value} -> {new.value}: {inst.message}", **extra)

    def _save(self, inst: Instance) -> None:
        """Queue the instance's record for state.json (written off the loop, newest wins)."""
        self._writer.record(inst.name, self.record(inst))

    @staticmethod
    def record(inst: Instance) -> dict[str, Any]:
        """The instance as state.json keeps it (and as ``views.model_view`` reads it)."""
        record: dict[str, Any] = {
            "phase": inst.phase.value,
            "phaseSince": _iso(inst.phase_since),
            "message": inst.message,
            "generation": inst.generation,
            "incarnation": inst.incarnation,
        }
        if inst.handle is not None:
            record["handle"] = inst.handle
            record["pid"] = inst.handle.get("pid")
            record["startedAt"] = inst.handle.get("started_at")
        if inst.launch is not None:
            record["port"] = inst.launch.port
            record["servedModel"] = inst.launch.served_model
            record["runtime"] = inst.launch.runtime
            record["healthPath"] = inst.launch.health_path
            record["maxConnections"] = inst.launch.max_connections
            record["argv"] = inst.launch.argv
            if inst.launch.secret_file:
                record["secretFile"] = inst.launch.secret_file  # the secret itself is never recorded
        if inst.last_failure:
            record["lastFailure"] = inst.last_failure
        if inst.refusal:
            record["refusal"] = inst.refusal
        return record

    def _event(self, kind: str, name: str, type_: str, reason: str, message: str, **extra: Any) -> Event:
        return self.events.emit(kind, name, type_, reason, message, **extra)

    async def recorded(self, timeout: float = 5.0) -> bool:
        """Wait until state.json holds every change made so far (the CLI reads it after a command)."""
        return await self._writer.settled(timeout)

    def status(self) -> dict[str, Any]:
        """What the admin API reports: every instance's phase and load, and a store problem if there is one."""
        instances = {name: {"phase": inst.phase.value, "message": inst.message, "inflight": inst.inflight,
                            "waiting": inst.waiting, "incarnation": inst.incarnation,
                            "pid": _pid(inst.handle),
                            "port": inst.launch.port if inst.launch else None}
                     for name, inst in self.instances.items()}
        held = self.events.since()
        return {"instances": instances, "storeProblem": self.store_problem,
                "lastEvent": held[-1]["seq"] if held else None}

    async def reattach(self) -> list[str]:
        """Adopt runtimes a previous daemon left running and healthy; stop the others that still run (their model
        was deleted, they were being stopped or had failed, or their manager restarted them since), so none is
        left running untracked. A record that cannot be read or checked is reported, never skipped silently."""
        state = await asyncio.to_thread(self.store.state.load)
        self.doc()
        adopted: list[str] = []
        notes: dict[str, str] = {}
        for name, record in state["instances"].items():
            if not record.get("handle"):
                continue
            try:
                note = await self._reattach_one(name, record)
            except (ValueError, TypeError) as exc:  # no manager can read the handle: nothing can reach its job
                note = (f"could not check the runtime its record names ({exc}); it may still run "
                        f"(pid {record.get('pid')!r})")
                log.warning("%s: %s", name, note)
                self._event("Model", name, "Warning", "UnreadableRecord", note)
            except Exception as exc:  # noqa: BLE001 - its manager failed: keep the handle and retry the stop
                self._adopt_unstopped(name, record, exc)
                note = None
            if note is None:
                adopted.append(name)
            elif note:
                notes[name] = note
        for name, record in state["instances"].items():
            if name in adopted:
                continue
            if name not in self._doc["models"] and name not in notes:
                self._writer.forget(name)  # a deleted model with nothing left to say
                continue
            cleared = {"phase": "Standby", "phaseSince": _iso(time.time()), "message": notes.get(name, ""),
                       "generation": 0}
            if record.get("lastFailure"):
                cleared["lastFailure"] = record["lastFailure"]
            self._writer.record(name, cleared)
        return adopted

    def _adopt_unstopped(self, name: str, record: dict[str, Any], error: Exception) -> None:
        """A runtime a previous daemon left, which its manager could not check or stop: tracked like any stop
        that failed (Failed, StopFailed, its handle kept and the stop retried), never dropped."""
        raw = record["handle"]
        log.warning("%s: stopping or checking pid %s left by the previous daemon failed: %s", name, _pid(raw), error)
        inst = self.instance(name)
        inst.handle, inst.launch, inst.generation = raw, _recorded_launch(record), record.get("generation", 0)
        inst.move(Phase.STARTING, f"re-attaching to pid {_pid(raw)}")
        inst.move(Phase.STOPPING, f"stopping pid {_pid(raw)}, left running by the previous daemon")
        self._stop_failed(inst, raw, error)

    async def _reattach_one(self, name: str, record: dict[str, Any]) -> str | None:
        """Adopt (None) or stop the runtime of one record; returns what to note on the record ("" for nothing)."""
        raw = record["handle"]
        manager = self.managers.of(raw, self._gateway)
        observed = await manager.observe(raw)
        if not observed.running and not (observed.pid and observed.pid != raw.get("pid")):
            return ""  # gone (a job its manager restarted meanwhile runs another pid: that one is stopped below)
        launch = _recorded_launch(record)
        if not observed.running:
            why = "its service manager restarted it while no gateway watched"
        elif name not in self._doc["models"]:
            why = "its model was deleted"
        elif record.get("phase") not in ("Ready", "Starting"):
            why = f"it was {record.get('phase')}"
        elif launch.secret_file and launch.secret is None:
            why = f"its secret {launch.secret_file} is gone, so the gateway cannot talk to it"
        elif not await self._healthy(launch):
            why = "it did not answer its health check"
        else:
            self._adopt(name, raw, launch, record)
            return None
        pid = observed.pid or _pid(raw)
        log.info("%s: stopping runtime pid %s left by the previous daemon: %s", name, pid, why)
        await manager.stop(raw, STOP_TIMEOUT_S)
        self.orphans_stopped[name] = pid
        note = f"stopped runtime pid {pid} left running by the previous daemon: {why}"
        self._event("Model", name, "Normal", "Orphan", note)
        return note

    def _adopt(self, name: str, handle: Handle, launch: LaunchSpec, record: dict[str, Any]) -> None:
        inst = self.instance(name)
        inst.handle, inst.launch, inst.generation = handle, launch, record.get("generation", 0)
        inst.move(Phase.STARTING, f"re-attaching to pid {_pid(handle)}")
        inst.move(Phase.READY, f"re-attached to pid {_pid(handle)}")

    async def _healthy(self, launch: LaunchSpec) -> bool:
        try:
            return await probe_once(self.session, launch, timeout=5.0)
        except NotReady:
            return False

    # ------------------------------------------------------------------ background duties

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task the controller owns: awaited at close, and its failure logged rather than lost."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name="controller-monitor")

    async def close(self) -> None:
        if self._monitor:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        await self.stop_all()
        for task in list(self._probes.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._writer.close()

    async def _watch(self) -> None:
        """Notice crashes, hung runtimes, deleted and idle models; reap; rotate logs. Every half second."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            try:
                await self._check()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one bad check
                log.exception("monitor check failed")

    async def _check(self) -> None:
        """One look at every instance: the managers are asked about the running ones together, then what is
        decided (a stop, a probe, housekeeping) runs as a task of its own, so the look itself is short."""
        watched = [(i, i.incarnation, i.handle) for i in self.instances.values()
                   if i.phase in (Phase.READY, Phase.DRAINING) and i.handle]
        seen = await asyncio.gather(*(self._manager(h).observe(h) for _, _, h in watched), return_exceptions=True)
        for (inst, incarnation, handle), state in zip(watched, seen, strict=True):
            if isinstance(state, BaseException):
                log.warning("%s: cannot ask its manager about it: %s", inst.name, state)
            elif not state.running and inst.handle is handle:  # about the runtime observed, not a newer one
                if state.exit_code is not None:
                    self._crashed(inst, incarnation, state.exit_code)
                else:  # dead, its exit code not collected yet: the look requests share finds it
                    self._death_check(inst, incarnation)
        models = self.doc()["models"]
        now = time.monotonic()
        for inst in list(self.instances.values()):
            if inst.name not in models and self._settled(inst):
                self._forget(inst)
                continue
            if inst.phase is not Phase.READY or inst.name in self._stops or inst.name in self._reloading:
                continue
            obj = models.get(inst.name)
            if obj is None:
                log.info("%s was deleted: stopping it", inst.name)
                self._spawn(self.stop(inst.name), f"stop-deleted-{inst.name}")
                continue
            if self._outdated(inst):
                log.info("%s: its spec changed: reloading it", inst.name)
                self._spawn(self._reload(inst), f"reload-{inst.name}")
                continue
            idle_limit = parse_duration(self._setting(obj, "idleTimeout"))
            idle_for = now - inst.last_used
            pinned = obj["spec"].get("residency") == "pinned"
            if idle_limit and not pinned and inst.inflight == 0 and idle_for > idle_limit:
                log.info("%s idle for %.0f s: unloading", inst.name, idle_for)
                self._spawn(self.stop(inst.name), f"stop-idle-{inst.name}")
                continue
            self._maybe_probe(inst, now)
        if now >= self._next_housekeeping and (self._housekeeper is None or self._housekeeper.done()):
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
            self._housekeeper = self._spawn(self._housekeeping(), "housekeeping")
        if now >= self._next_drift_check and (self._drift_checker is None or self._drift_checker.done()):
            self._next_drift_check = now + DRIFT_INTERVAL_S
            self._drift_checker = self._spawn(self._reload_drifted(), "drift")

    def _settled(self, inst: Instance) -> bool:
        """Nothing runs, waits or is under way for ``inst``: no process (a failed stop keeps its handle), no
        request, no task of the controller's."""
        tasks = [inst.start_task, inst.cleanup_task, self._stops.get(inst.name)]
        return (inst.phase in (Phase.STANDBY, Phase.FAILED) and inst.handle is None and not inst.inflight
                and not inst.waiting and inst.name not in self._reloading
                and all(task is None or task.done() for task in tasks)
                and not any(name == inst.name for name, _ in self._death_checks))

    def _forget(self, inst: Instance) -> None:
        """Drop the instance of a deleted model once it is stopped: from /status, the metrics gauges and
        state.json, so deleted models do not pile up in a long-running gateway."""
        log.info("%s was deleted and is stopped: forgetting it", inst.name)
        del self.instances[inst.name]
        self._next_probe.pop(inst.name, None)
        self._writer.forget(inst.name)
        self._event("Model", inst.name, "Normal", "Forgotten", "deleted and stopped: no longer tracked")

    async def _reload_drifted(self) -> None:
        """Reload a loaded model whose job would run differently now although its spec kept its generation: a
        recipe it uses was edited, the Gateway names another runtime binary, or a scan found its files changed.
        Its service file already says so (apply rewrote it); the runtime must follow."""
        loaded = [(i, i.incarnation, i.launch.argv, self._doc["models"].get(i.name)) for i in self.instances.values()
                  if i.phase is Phase.READY and i.launch is not None and i.launch.argv]
        doc = self._doc

        def drifted() -> list[tuple[Instance, int]]:  # launch_for looks on disk for the runtime: off the loop
            found = []
            for inst, incarnation, argv, obj in loaded:
                launch = actions.launch_for(doc, obj) if obj else None
                if launch is not None and launch.argv != argv:
                    found.append((inst, incarnation))
            return found

        for inst, incarnation in await asyncio.to_thread(drifted):
            if inst.incarnation == incarnation and inst.phase is Phase.READY and inst.name not in self._stops:
                log.info("%s: what it runs changed: reloading it", inst.name)
                self._spawn(self._reload(inst), f"reload-{inst.name}")

    async def _housekeeping(self) -> None:
        """Each manager collects its exited children and rotates the logs of the jobs it runs."""
        by_manager: dict[int, tuple[ServiceManager, list[Handle]]] = {}
        for inst in self.instances.values():
            if inst.handle is not None:
                manager = self._manager(inst.handle)
                by_manager.setdefault(id(manager), (manager, []))[1].append(inst.handle)
        process = self.managers.get("process", self._gateway)
        by_manager.setdefault(id(process), (process, []))  # its children are reaped even when none is loaded
        for manager, handles in by_manager.values():
            await manager.housekeeping(handles)

    def _maybe_probe(self, inst: Instance, now: float) -> None:
        check = self._gateway["healthCheck"]
        interval = parse_duration(check["interval"])
        if not interval or inst.name in self._probes or now < self._next_probe.get(inst.name, 0.0):
            return
        self._next_probe[inst.name] = now + interval
        timeout = parse_duration(check["timeout"]) or interval
        self._probes[inst.name] = self._spawn(self._probe(inst, inst.incarnation, timeout, check["failureThreshold"]),
                                              f"probe-{inst.name}")

    def runtime_errored(self, inst: Instance, incarnation: int, status: int) -> None:
        """A request got a server error from runtime ``incarnation``. Errors can be the request's fault, so a run
        of ``healthCheck.failureThreshold`` of them only makes the controller try a one-token generation of its
        own (one at a time); a runtime that fails that too is alive but broken (mlx_lm.server after its
        generation thread died answers every request with an error) and is restarted like a crashed one."""
        if inst.incarnation != incarnation or inst.phase is not Phase.READY:
            return
        inst.error_streak += 1
        threshold = self._gateway["healthCheck"]["failureThreshold"]
        key = f"generation-{inst.name}"
        if inst.error_streak >= threshold and key not in self._probes:
            self._probes[key] = self._spawn(self._probe_generation(inst, incarnation, status, key), key)

    async def _probe_generation(self, inst: Instance, incarnation: int, status: int, key: str) -> None:
        try:
            assert inst.launch is not None
            artifact = (self._doc["models"].get(inst.name) or {}).get("artifact") or {}
            task = artifact.get("metadata", {}).get("task")
            problem = await generates(self.session, inst.launch, GENERATION_PROBE_TIMEOUT_S, task)
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
            answered = await answers(self.session, inst.launch.port, timeout, secret=inst.launch.secret)
        finally:
            self._probes.pop(inst.name, None)
        if inst.incarnation != incarnation or inst.phase is not Phase.READY:
            return
        inst.missed_probes = 0 if answered else inst.missed_probes + 1
        if inst.missed_probes >= threshold:
            self._fail(inst, f"not answering its health check ({threshold} probes of {timeout:g} s missed): hung",
                       "Hung")


GENERATION_PROBE_TIMEOUT_S = 60.0  # a test generation of one token waits behind requests in flight


def _pid(handle: Handle | None) -> int | None:
    return handle.get("pid") if handle else None


def _recorded_launch(record: dict[str, Any]) -> LaunchSpec:
    """How a runtime a previous daemon started is reached, from its state.json record."""
    runtime = record.get("runtime", "")
    default_connections = LLAMA_AUTO_PARALLEL if runtime == "llama-server" else MLX_MAX_CONNECTIONS
    launch = LaunchSpec(runtime, list(record.get("argv", [])), {}, record.get("port", 0), record.get("servedModel", ""),
                        record.get("healthPath", "/health"), record.get("maxConnections", default_connections),
                        secret_file=record.get("secretFile"))
    return runtime_secret.recalled(launch)  # read once per incarnation, never per request


async def stop_left_behind(store: Store) -> dict[str, int | None]:
    """``athanor down`` without a gateway: stop the runtimes a dead one left, through the same state machine and
    records (adopted and then stopped, or stopped at once when not adoptable). Returns {model: pid} of those that
    were still running. Raises AthanorError naming those that could not be stopped: their handles stay recorded."""
    from athanor.controller.readiness import probe_session

    async with probe_session() as session:
        controller = Controller(store, Managers(store.home), session)
        await controller.reattach()
        tracked = {name: _pid(inst.handle) for name, inst in controller.instances.items() if inst.handle}
        await controller.close()
    left = {name: inst for name, inst in controller.instances.items() if inst.handle is not None}
    if left:  # their handles stay in state.json: the next 'athanor down' tries again
        raise AthanorError("could not stop " + "; ".join(
            f"model/{name} (pid {_pid(inst.handle)}): {(inst.last_failure or {}).get('message', inst.message)}"
            for name, inst in sorted(left.items())) + " ('athanor down' tries again)")
    return {**controller.orphans_stopped, **tracked}
