"""The controller: desired state from the store, instances in memory, processes through the supervisor.

The ingress asks for exactly one thing: ``async with controller.use(name) as upstream``. The controller decides
whether that means nothing (ready), waiting (a start is under way: everyone shares it), starting, or swapping.

Swap policy (anti-thrash). Requests for a model that is serving (ready, not being stopped) go straight to it,
whatever else is loading: under ``memory`` residency one model keeps answering while another loads. Every other
request enters the swap gate (``gate.py``). A swap marks the models it stops as draining: their requests already
in flight finish first (bounded by ``DRAIN_TIMEOUT_S``), new ones queue in the gate, then the old model stops and
the new one starts. Whenever the gate passes on, waiters whose model is serving go ahead of waiters that need a
swap (bounded by ``MAX_JUMPS``), so clients alternating between models are served in batches, one swap per batch,
rather than one swap per request.

Residency: ``single`` keeps one model loaded; ``memory`` keeps several while their estimates fit the budget,
evicting the least recently used first. ``pinned`` models are never evicted; ``disabled`` ones never start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import aiohttp

from athanor import actions, catalog
from athanor.controller.gate import SwapGate
from athanor.controller.instance import Instance, Phase
from athanor.controller.readiness import NotReady, probe_once, wait_ready
from athanor.errors import AthanorError
from athanor.managers.process import ProcessHandle, ProcessSupervisor
from athanor.ports import port_holder, port_is_free
from athanor.runtimes.launch import LaunchSpec, find_runtime
from athanor.store import Store
from athanor.units import parse_budget, parse_duration

log = logging.getLogger("athanor.controller")

CRASH_WINDOW_S = 120.0
CRASH_LIMIT = 3
DRAIN_TIMEOUT_S = 30.0
MONITOR_INTERVAL_S = 0.5


class ModelUnavailable(AthanorError):
    """The model cannot be served now (failed to start, disabled, weights missing)."""


class QueueFull(AthanorError):
    """Too many requests are already waiting for this model."""


@dataclass(frozen=True)
class Upstream:
    name: str
    port: int
    served_model: str


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Controller:
    def __init__(self, store: Store, supervisor: ProcessSupervisor, session: aiohttp.ClientSession):
        self.store = store
        self.supervisor = supervisor
        self.session = session
        self.instances: dict[str, Instance] = {}
        self._gate = SwapGate(self.serving)
        self._doc: dict[str, Any] = {"models": {}, "recipes": {}, "gateway": None, "ignoredSources": []}
        self._doc_stamp: tuple[int, int, int] | None = None
        self._names: dict[str, str] = {}
        self._monitor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ desired state

    def doc(self) -> dict[str, Any]:
        """models.json, re-read when it changed on disk: ``apply`` reaches a running daemon this way, at once.

        One stat per call (about a microsecond); the parse and the name index are redone only on a change.
        """
        try:
            st = os.stat(self.store.models.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # every atomic write is a new inode
        except FileNotFoundError:
            stamp = None
        if stamp != self._doc_stamp:
            self._doc = self.store.models.load()
            self._doc_stamp = stamp
            self._names = self._index(self._doc["models"])
        return self._doc

    @staticmethod
    def _index(models: dict[str, Any]) -> dict[str, str]:
        """Every name a client may use -> the model's name. Names win over aliases, aliases over HF ids."""
        names: dict[str, str] = {}
        for name, obj in models.items():
            hf = obj["spec"]["source"].get("hf")
            if hf:
                names[hf["repo"]] = name
                names[f"{hf['repo']}:{hf.get('file')}"] = name
        for name, obj in models.items():
            names.update((alias, name) for alias in obj["spec"].get("aliases", ()))
        names.update((name, name) for name in models)
        return names

    def gateway(self) -> dict[str, Any]:
        return catalog.gateway_spec(self.doc())

    def _setting(self, obj: dict[str, Any] | None, key: str) -> Any:
        """A model's own ``spec.<key>``, else the Gateway's (startupTimeout, idleTimeout)."""
        own = (obj or {}).get("spec", {}).get(key)
        return own if own is not None else self.gateway()[key]

    def resolve(self, requested: str) -> str | None:
        """A model's name from its name, an alias, or its discovered id (``org/repo`` or ``org/repo:file``)."""
        self.doc()
        return self._names.get(requested)

    def _outdated(self, inst: Instance) -> bool:
        """Started from an older generation of its spec (a re-attached instance of unknown generation is not).

        Reads the document as last loaded: every request resolves its model first, which re-reads it if changed.
        """
        obj = self._doc["models"].get(inst.name)
        return bool(obj and inst.generation and obj["metadata"].get("generation", 1) != inst.generation)

    def serving(self, name: str) -> bool:
        """A request for ``name`` can go straight to its runtime: ready, not being stopped, spec unchanged."""
        inst = self.instances.get(name)
        return inst is not None and inst.phase is Phase.READY and not inst.draining and not self._outdated(inst)

    def instance(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst is None:
            inst = self.instances[name] = Instance(name, on_change=self._persist)
        return inst

    # ------------------------------------------------------------------ the one entry point

    def use(self, name: str) -> _Use:
        """Hold ``name`` ready for the duration of one request: ``async with controller.use(name) as upstream``."""
        return _Use(self, name)

    async def ensure_ready(self, name: str) -> Instance:
        inst = self.instance(name)
        if self.serving(name):
            return inst
        limit = self.gateway()["limits"]["maxQueue"]
        if inst.waiting >= limit:
            raise QueueFull(f"{inst.waiting} requests already wait for model {name!r} (limits.maxQueue {limit})")
        inst.waiting += 1
        try:
            async with self._gate.hold(name):
                return await self._make_ready(name)
        finally:
            inst.waiting -= 1

    async def _make_ready(self, name: str) -> Instance:
        inst = self.instance(name)
        while True:
            self.doc()  # it may have changed while this request waited
            if inst.phase is Phase.READY and self._outdated(inst):
                await self.stop(name)  # its spec changed since it started: drain, then start it anew
                continue
            if inst.phase is Phase.READY and inst.draining:
                await inst.changed.wait()  # an idle unload is stopping it: start it again once it stopped
                continue
            if inst.phase is Phase.READY:
                return inst
            if inst.phase is Phase.STARTING and inst.start_task is not None:
                await asyncio.shield(inst.start_task)
                continue
            if inst.phase is Phase.STOPPING:
                await inst.changed.wait()
                continue
            if inst.phase is Phase.FAILED:
                if self._crash_looping(inst):
                    raise ModelUnavailable(f"model {name!r} failed {CRASH_LIMIT} times in {CRASH_WINDOW_S:.0f} s: "
                                           f"{inst.message} (athanor restart {name} retries)")
                await asyncio.sleep(self._backoff(inst))  # restart backoff: 0.5 s, 1 s, 2 s ... after a failure
            obj = self.doc()["models"].get(name)
            if obj is None:
                raise ModelUnavailable(f"model {name!r} no longer exists")
            if obj["spec"].get("residency") == "disabled":
                raise ModelUnavailable(f"model {name!r} is disabled (spec.residency)")
            await self._make_room(name)
            inst.start_task = asyncio.create_task(self._start(inst, obj), name=f"start-{name}")
            await asyncio.shield(inst.start_task)
            if inst.phase is Phase.FAILED:
                raise ModelUnavailable(f"model {name!r} failed to start: {inst.message}")

    # ------------------------------------------------------------------ starting and stopping

    async def _start(self, inst: Instance, obj: dict[str, Any]) -> None:
        doc = self.doc()
        inst.move(Phase.STARTING, "starting")
        try:
            launch = actions.launch_for(doc, obj)
            if launch is None:
                raise NotReady("weights not found on disk (see 'athanor describe model')")
            configured = self.gateway()["runtimes"].get(launch.runtime, {}).get("path")
            find_runtime(launch.runtime, configured)  # a missing runtime fails here, naming the install command
            await asyncio.to_thread(_ensure_port_free, launch.port)
            inst.launch = launch
            inst.generation = obj["metadata"].get("generation", 1)
            inst.handle = await asyncio.to_thread(self.supervisor.start, inst.name, launch.argv, launch.env)
            self._persist(inst, inst.phase)
            timeout = parse_duration(self._setting(obj, "startupTimeout")) or 3600.0
            waited = await wait_ready(self.session, launch, timeout=timeout, alive=lambda: self._alive(inst))
        except (NotReady, AthanorError) as exc:
            await self._fail(inst, str(exc))
            return
        except asyncio.CancelledError:
            await self._stop(inst)
            raise
        log.info("%s ready in %.2f s (pid %s)", inst.name, waited, inst.handle.pid)
        inst.move(Phase.READY, f"ready in {waited:.2f} s")

    def _alive(self, inst: Instance) -> bool:
        return inst.handle is not None and self.supervisor.alive(inst.handle)

    async def _fail(self, inst: Instance, reason: str) -> None:
        exit_code = None
        if inst.handle is not None:
            exit_code = await asyncio.to_thread(self.supervisor.stop, inst.handle, 5.0)
            tail = self.supervisor.log_tail(inst.name, 20)
        else:
            tail = []
        now = time.time()
        inst.failures = [t for t in inst.failures if now - t < CRASH_WINDOW_S] + [now]
        inst.last_failure = {"reason": "StartFailed" if inst.phase is Phase.STARTING else "Crashed",
                             "message": reason, "time": _iso(now), "exitCode": exit_code, "logTail": tail}
        inst.handle = None
        inst.move(Phase.FAILED, reason)

    @staticmethod
    def _backoff(inst: Instance) -> float:
        if not inst.failures:
            return 0.0
        delay = min(0.5 * 2 ** (len(inst.failures) - 1), 8.0)
        return max(0.0, inst.failures[-1] + delay - time.time())

    def _crash_looping(self, inst: Instance) -> bool:
        now = time.time()
        return len([t for t in inst.failures if now - t < CRASH_WINDOW_S]) >= CRASH_LIMIT

    async def stop(self, name: str, *, drain: bool = True) -> None:
        inst = self.instances.get(name)
        if inst is None:
            return
        inst.draining = True
        if inst.phase is Phase.STARTING and inst.start_task is not None:
            inst.start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inst.start_task
        if drain and inst.inflight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(inst.idle.wait(), DRAIN_TIMEOUT_S)
        await self._stop(inst)

    async def _stop(self, inst: Instance) -> None:
        if inst.phase in (Phase.STANDBY, Phase.STOPPING):
            return
        inst.move(Phase.STOPPING, "stopping")
        if inst.handle is not None:
            await asyncio.to_thread(self.supervisor.stop, inst.handle)
        inst.handle = None
        inst.move(Phase.STANDBY, "stopped")

    async def restart(self, name: str) -> None:
        inst = self.instance(name)
        inst.failures.clear()
        await self.stop(name)
        await self.ensure_ready(name)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(name, drain=False) for name in list(self.instances)))

    def running(self, name: str) -> bool:
        """Whether the runtime process of ``name`` is still alive (a cheap check after a stream ends)."""
        inst = self.instances.get(name)
        return bool(inst and inst.handle and self.supervisor.alive(inst.handle))

    async def check(self, name: str) -> None:
        """Called when a request could not reach a runtime: if it died, record the crash now rather than at
        the monitor's next round, so the next request restarts it."""
        inst = self.instances.get(name)
        if inst and inst.phase is Phase.READY and inst.handle and not self.supervisor.alive(inst.handle):
            code = self.supervisor.exit_code(inst.handle)
            await self._fail(inst, f"the runtime exited unexpectedly (exit code {code})")

    # ------------------------------------------------------------------ residency

    async def _make_room(self, name: str) -> None:
        """Stop what must go before ``name`` starts (the caller holds the swap gate)."""
        models = self.doc()["models"]
        loaded = [i for i in self.instances.values()
                  if i.name != name and i.phase in (Phase.READY, Phase.STARTING)]
        evictable = [i for i in loaded if models.get(i.name, {}).get("spec", {}).get("residency") != "pinned"]
        residency = self.gateway()["residency"]
        if residency["policy"] == "memory":
            evictable = self._over_budget(name, loaded, evictable, residency.get("budget", "80%"))
        await asyncio.gather(*(self.stop(i.name) for i in evictable))

    def _over_budget(self, name: str, loaded: list[Instance], evictable: list[Instance], budget: str) -> list[Instance]:
        import psutil

        limit = parse_budget(budget, psutil.virtual_memory().total)
        need = estimate_bytes(self.doc()["models"].get(name))
        used = sum(estimate_bytes(self.doc()["models"].get(i.name)) for i in loaded)
        victims = []
        for inst in sorted(evictable, key=lambda i: i.last_used):  # least recently used first
            if used + need <= limit:
                break
            victims.append(inst)
            used -= estimate_bytes(self.doc()["models"].get(inst.name))
        return victims

    # ------------------------------------------------------------------ observed state

    def _persist(self, inst: Instance, old: Phase) -> None:
        record = {
            "phase": inst.phase.value,
            "phaseSince": _iso(inst.phase_since),
            "message": inst.message,
            "generation": inst.generation,
        }
        if inst.handle is not None:
            record["handle"] = inst.handle.to_json()
            record["pid"] = inst.handle.pid
            record["startedAt"] = inst.handle.started_at
        if inst.launch is not None:
            record["port"] = inst.launch.port
            record["servedModel"] = inst.launch.served_model
            record["runtime"] = inst.launch.runtime
            record["healthPath"] = inst.launch.health_path
        if inst.last_failure:
            record["lastFailure"] = inst.last_failure
        event = {"time": _iso(time.time()), "kind": "Model", "name": inst.name,
                 "type": "Warning" if inst.phase is Phase.FAILED else "Normal",
                 "reason": inst.phase.value, "message": f"{old.value} -> {inst.phase.value}: {inst.message}"}
        with self.store.state.edit() as state:
            state["instances"][inst.name] = record
            if old is not inst.phase:  # a refresh of the record (the pid is known now) is no event
                state["events"] = (state["events"] + [event])[-actions.MAX_EVENTS:]

    async def reattach(self) -> list[str]:
        """Adopt runtimes a previous daemon left running and healthy; forget the rest."""
        adopted: list[str] = []
        records = self.store.state.load()["instances"]
        for name, record in records.items():
            handle_data = record.get("handle")
            if not handle_data or record.get("phase") not in ("Ready", "Starting") or name not in self.doc()["models"]:
                continue
            try:
                handle = ProcessHandle.from_json(handle_data)
            except ValueError:
                continue
            launch = LaunchSpec(record.get("runtime", ""), [], {}, record.get("port", 0),
                                record.get("servedModel", ""), record.get("healthPath", "/health"))
            if self.supervisor.alive(handle) and await self._healthy(launch):
                inst = self.instance(name)
                inst.handle, inst.launch, inst.generation = handle, launch, record.get("generation", 0)
                inst.phase, inst.message = Phase.READY, f"re-attached to pid {handle.pid}"
                inst.last_used = time.monotonic()
                self._persist(inst, Phase.STANDBY)
                adopted.append(name)
            elif self.supervisor.alive(handle):
                await asyncio.to_thread(self.supervisor.stop, handle)
        with self.store.state.edit() as state:
            for name in list(state["instances"]):
                if name not in adopted:
                    state["instances"][name] = {"phase": "Standby", "phaseSince": _iso(time.time()),
                                                "message": "", "generation": 0}
        return adopted

    async def _healthy(self, launch: LaunchSpec) -> bool:
        try:
            return await probe_once(self.session, launch, timeout=5.0)
        except NotReady:
            return False

    # ------------------------------------------------------------------ background duties

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name="controller-monitor")

    async def close(self) -> None:
        if self._monitor:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.stop_all()

    async def _watch(self) -> None:
        """Notice crashes and idle models; rotate logs. Runs every half second."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            try:
                await self._check()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one bad check
                log.exception("monitor check failed")

    async def _check(self) -> None:
        models = self.doc()["models"]
        for inst in list(self.instances.values()):
            if inst.phase is not Phase.READY or inst.handle is None:
                continue
            if inst.name not in models:
                log.info("%s was deleted: stopping it", inst.name)
                await self.stop(inst.name)
                continue
            if not self.supervisor.alive(inst.handle):
                log.warning("%s died", inst.name)
                await self.check(inst.name)
                continue
            self.supervisor.rotate_logs(inst.handle)
            pinned = models[inst.name]["spec"].get("residency") == "pinned"
            idle_limit = parse_duration(self._setting(models[inst.name], "idleTimeout"))
            idle_for = time.monotonic() - inst.last_used
            if idle_limit and not pinned and inst.inflight == 0 and idle_for > idle_limit:
                log.info("%s idle for %.0f s: unloading", inst.name, idle_for)
                await self.stop(inst.name)


def _ensure_port_free(port: int) -> None:
    """Fail a start at once when something else holds its port: a runtime that cannot bind may never exit."""
    if not port_is_free(port, reuse_address=True):
        raise NotReady(f"port {port} is in use by {port_holder(port)}; set spec.port to a free one, "
                       "or stop what holds it")


class _Use:
    """``Controller.use`` as a class rather than a generator: it runs on every request."""

    __slots__ = ("_controller", "_name", "_instance")

    def __init__(self, controller: Controller, name: str):
        self._controller, self._name = controller, name
        self._instance: Instance | None = None

    async def __aenter__(self) -> Upstream:
        inst = self._instance = await self._controller.ensure_ready(self._name)
        inst.enter()
        assert inst.launch is not None
        return Upstream(self._name, inst.launch.port, inst.launch.served_model)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._instance is not None
        self._instance.leave()


def estimate_bytes(obj: dict[str, Any] | None) -> int:
    """Weights on disk plus the KV cache at the model's context (fp16), plus a fixed overhead."""
    if not obj or not obj.get("artifact"):
        return 0
    artifact = obj["artifact"]
    meta = artifact.get("metadata", {})
    weights = artifact.get("sizeBytes", 0)
    layers, heads, kv_heads = meta.get("layers"), meta.get("heads"), meta.get("kvHeads") or meta.get("heads")
    embedding = meta.get("embeddingLength") or meta.get("hiddenSize")
    ctx = obj["spec"].get("preset", {}).get("ctxSize") or min(meta.get("contextLength") or 8192, 32768)
    kv = 0
    if layers and heads and kv_heads and embedding:
        head_dim = embedding // heads
        kv = 2 * layers * kv_heads * head_dim * ctx * 2
    return weights + kv + 256 * 2**20
