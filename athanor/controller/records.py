"""What an instance looks like from outside: its state.json record and its line in the admin API's status.

Both are read-only views of an ``Instance``; the controller writes the record (``persist.py``) on every change,
and ``views.model_view`` and re-attach at the next daemon start read it back.
"""

from __future__ import annotations

from typing import Any

from athanor.controller.instance import Instance
from athanor.managers.base import Handle
from athanor.timestamps import utc_timestamp


def pid_of(handle: Handle | None) -> int | None:
    """The process id a handle names (None: no handle, or a manager's handle without one)."""
    return handle.get("pid") if handle else None


def job_of(handle: Handle | None) -> str:
    """The job a handle names, for messages: its process (``pid 123``), or its pod under Kubernetes."""
    if handle and handle.get("pod"):
        return f"pod {handle.get('namespace', '')}/{handle['pod']}"
    return f"pid {pid_of(handle)}"


def record(inst: Instance) -> dict[str, Any]:
    """The instance as state.json keeps it (and as ``views.model_view`` reads it)."""
    out: dict[str, Any] = {
        "phase": inst.phase.value,
        "phaseSince": utc_timestamp(inst.phase_since),
        "message": inst.message,
        "generation": inst.generation,
        "incarnation": inst.incarnation,
    }
    if inst.handle is not None:
        out["handle"] = inst.handle
        out["pid"] = inst.handle.get("pid")
        if inst.handle.get("pod"):
            out["pod"] = inst.handle["pod"]
        out["startedAt"] = inst.handle.get("started_at")
    if inst.launch is not None:
        out["port"] = inst.launch.port
        out["servedModel"] = inst.launch.served_model
        out["runtime"] = inst.launch.runtime
        out["healthPath"] = inst.launch.health_path
        out["maxConnections"] = inst.launch.max_connections
        out["argv"] = inst.launch.argv
        if inst.launch.secret_file:
            out["secretFile"] = inst.launch.secret_file  # the secret itself is never recorded
        if inst.launch.park_dir:
            out["parkDir"] = inst.launch.park_dir  # a re-attached runtime parks its slots when it stops
        if inst.launch.socket:
            out["socket"] = inst.launch.socket  # a re-attached runtime is reached there as before
    if inst.last_failure:
        out["lastFailure"] = inst.last_failure
    if inst.refusal:
        out["refusal"] = inst.refusal
    return out


def standby_record(at: float, message: str, last_failure: dict[str, Any] | None) -> dict[str, Any]:
    """The record of a model whose runtime a previous daemon left and this one did not adopt: Standby, saying why,
    keeping the last failure it had."""
    out: dict[str, Any] = {"phase": "Standby", "phaseSince": utc_timestamp(at), "message": message, "generation": 0}
    if last_failure:
        out["lastFailure"] = last_failure
    return out


def status_line(inst: Instance) -> dict[str, Any]:
    """One instance in the admin API's status: its phase and load."""
    line = {"phase": inst.phase.value, "message": inst.message, "inflight": inst.inflight, "waiting": inst.waiting,
            "incarnation": inst.incarnation, "pid": pid_of(inst.handle),
            "port": inst.launch.port if inst.launch else None}
    if inst.handle and inst.handle.get("pod"):  # a runtime in a cluster has a pod where a local one has a pid
        line["pod"] = inst.handle["pod"]
    return line
