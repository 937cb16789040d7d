"""Re-attach at daemon start: adopt the runtimes a previous daemon left running and healthy, stop the others.

A daemon that died (or was killed) leaves its runtimes running, their handles in state.json. The next one adopts
each that still runs the spec it was started from and answers its health check; every other one that still runs
is stopped (its model was deleted, it was being stopped or had failed, its secret is gone, or its service manager
restarted it while no gateway watched), so none is left running untracked. A record that cannot be read or
checked is reported, never skipped silently, and a runtime whose manager cannot check or stop it is tracked like
any stop that failed, its handle kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import aiohttp

from athanor.controller.events import EventLog
from athanor.controller.persist import StateWriter
from athanor.controller.readiness import NotReady, probe_once
from athanor.controller.records import job_of, pid_of, standby_record
from athanor.controller.stopping import STOP_TIMEOUT_S
from athanor.managers.base import Handle, ServiceManager, located
from athanor.runtimes import secret as runtime_secret
from athanor.runtimes.launch import LLAMA_AUTO_PARALLEL, MLX_MAX_CONNECTIONS, LaunchSpec
from athanor.store import Store

log = logging.getLogger("athanor.controller")


class Adopting(Protocol):
    """What re-attach needs from whoever owns the instances (the Controller), and no more."""

    store: Store
    session: aiohttp.ClientSession
    events: EventLog
    orphans_stopped: dict[str, int | None]

    def doc(self) -> dict[str, Any]: ...

    def manager_of(self, handle: Handle) -> ServiceManager: ...

    def current_manager(self) -> ServiceManager: ...

    def adopt(self, name: str, handle: Handle, launch: LaunchSpec, generation: int) -> None: ...

    def adopt_unstopped(self, name: str, handle: Handle, launch: LaunchSpec, generation: int,
                        error: Exception) -> None: ...


async def reattach_all(owner: Adopting, writer: StateWriter) -> list[str]:
    """Adopt or stop the runtime of every record in state.json that names one; rewrite the records of those not
    adopted (Standby, saying why). Returns the names adopted."""
    state = await asyncio.to_thread(owner.store.state.load)
    models = owner.doc()["models"]
    adopted: list[str] = []
    notes: dict[str, str] = {}
    for name, record in state["instances"].items():
        if not record.get("handle"):
            continue
        try:
            note = await _reattach_one(owner, models, name, record)
        except (ValueError, TypeError) as exc:  # no manager can read the handle: nothing can reach its job
            note = (f"could not check the runtime its record names ({exc}); it may still run "
                    f"(pid {record.get('pid')!r})")
            log.warning("%s: %s", name, note)
            owner.events.emit("Model", name, "Warning", "UnreadableRecord", note)
        except Exception as exc:  # noqa: BLE001 - its manager failed: keep the handle and retry the stop
            raw = record["handle"]
            log.warning("%s: stopping or checking %s left by the previous daemon failed: %s", name, job_of(raw),
                        exc)
            owner.adopt_unstopped(name, raw, recorded_launch(record), record.get("generation", 0), exc)
            note = None
        if note is None:
            adopted.append(name)
        elif note:
            notes[name] = note
    await _stop_strays(owner, [record["handle"] for name, record in state["instances"].items()
                               if name in adopted and record.get("handle")])
    for name, record in state["instances"].items():
        if name in adopted:
            continue
        if name not in models and name not in notes:
            writer.forget(name)  # a deleted model with nothing left to say
            continue
        writer.record(name, standby_record(time.time(), notes.get(name, ""), record.get("lastFailure")))
    return adopted


async def _reattach_one(owner: Adopting, models: dict[str, Any], name: str, record: dict[str, Any]) -> str | None:
    """Adopt (None) or stop the runtime of one record; returns what to note on the record ("" for nothing)."""
    raw = record["handle"]
    manager = owner.manager_of(raw)
    observed = await manager.observe(raw)
    if not observed.running and not (observed.pid and observed.pid != raw.get("pid")):
        return ""  # gone (a job its manager restarted meanwhile runs another pid: that one is stopped below)
    launch = recorded_launch(record)
    if not manager.local:  # a cluster's runtime takes the cluster's key; where it answers, its manager knows
        launch = manager.prepared(launch)
    launch = located(manager, raw, launch) or launch
    if not observed.running:
        why = "its service manager restarted it while no gateway watched"
    elif name not in models:
        why = "its model was deleted"
    elif record.get("phase") not in ("Ready", "Starting"):
        why = f"it was {record.get('phase')}"
    elif launch.secret_file and launch.secret is None:
        why = f"its secret {launch.secret_file} is gone, so the gateway cannot talk to it"
    elif not await _healthy(owner.session, launch):
        why = "it did not answer its health check"
    else:
        owner.adopt(name, raw, launch, record.get("generation", 0))
        return None
    pid = observed.pid or pid_of(raw)
    what = f"pid {pid}" if pid else job_of(raw)
    log.info("%s: stopping runtime %s left by the previous daemon: %s", name, what, why)
    await manager.stop(raw, STOP_TIMEOUT_S)
    owner.orphans_stopped[name] = pid
    note = f"stopped runtime {what} left running by the previous daemon: {why}"
    owner.events.emit("Model", name, "Normal", "Orphan", note)
    return note


async def _stop_strays(owner: Adopting, adopted: list[Handle]) -> None:
    """Stop what runs under the current manager that no record names. The local managers' jobs all have a record;
    in a cluster, a new gateway pod starts with an empty one while the model pods its predecessor scaled up still
    run (each may hold a GPU)."""
    manager = owner.current_manager()
    try:
        for handle in await manager.strays(adopted):
            log.info("stopping %s: it runs, and no record of this gateway names it", job_of(handle))
            await manager.stop(handle, STOP_TIMEOUT_S)
            owner.events.emit("Model", handle.get("model") or handle["deployment"], "Normal", "Orphan",
                              f"stopped {job_of(handle)}: it ran, and no record of this gateway named it")
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster must not keep the gateway from serving
        log.warning("could not look for runtimes no record names: %s", exc)
        owner.events.emit("Gateway", "default", "Warning", "StraysUnchecked",
                          f"could not look for runtimes no record names: {exc}")


async def _healthy(session: aiohttp.ClientSession, launch: LaunchSpec) -> bool:
    try:
        return await probe_once(session, launch, timeout=5.0)
    except NotReady:
        return False


def recorded_launch(record: dict[str, Any]) -> LaunchSpec:
    """How a runtime a previous daemon started is reached, from its state.json record."""
    runtime = record.get("runtime", "")
    default_connections = LLAMA_AUTO_PARALLEL if runtime == "llama-server" else MLX_MAX_CONNECTIONS
    launch = LaunchSpec(runtime, list(record.get("argv", [])), {}, record.get("port", 0), record.get("servedModel", ""),
                        record.get("healthPath", "/health"), record.get("maxConnections", default_connections),
                        secret_file=record.get("secretFile"), park_dir=record.get("parkDir"),
                        socket=record.get("socket"))
    return runtime_secret.recalled(launch)  # read once per incarnation, never per request
