"""Objects as users see them: stored desired state joined with observed state into a ``status``.

``status`` is never stored with the object; it is derived on every read from the detected artifact and the
instance the supervisor records in state.json, so it cannot go stale on disk.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

from athanor import catalog
from athanor.managers.base import same_start

PHASES = ("Standby", "Starting", "Ready", "Draining", "Stopping", "Failed", "Unknown")
_LIVE_PHASES = ("Starting", "Ready", "Draining", "Stopping")


def model_view(obj: dict[str, Any], instance: dict[str, Any] | None, gateway_up: bool = True) -> dict[str, Any]:
    """The model object with ``status``; the last-applied bookkeeping stays out of sight.

    A phase that only a running gateway can keep true (Ready, Starting, ...) is ``Unknown`` when the gateway is
    not running: its record says what was, not what is.
    """
    view = copy.deepcopy(obj)
    artifact = view.pop("artifact", None)
    view["metadata"].get("annotations", {}).pop(catalog.LAST_APPLIED, None)
    instance = instance or {}
    phase = instance.get("phase", "Standby")
    message = instance.get("message", "")
    if not gateway_up and phase in _LIVE_PHASES:
        phase, message = "Unknown", f"the gateway is not running (last recorded: {phase}, {message})"
    generation = obj["metadata"].get("generation", 1)
    observed = _observed_generation(instance, phase, generation, gateway_up)
    conditions = [_available_condition(artifact, obj, observed),
                  *_phase_conditions(phase, message, instance, obj, observed)]
    status: dict[str, Any] = {
        "phase": phase,
        "port": obj["spec"].get("port"),
        "observedGeneration": observed,
        "conditions": conditions,
    }
    for key in ("pid", "startedAt", "lastFailure"):
        if instance.get(key) is not None:
            status[key] = instance[key]
    if instance.get("handle") and instance.get("phase") in _LIVE_PHASES:
        status.update(_live(instance["handle"]))
    if artifact:
        status["artifact"] = artifact
    status["summary"] = _summary(conditions[0], obj, phase)
    view["status"] = status
    return view


def _live(handle: dict[str, Any]) -> dict[str, Any]:
    """Uptime and resident memory of the runtime, read from the process itself (if it is still ours)."""
    import psutil

    try:
        proc = psutil.Process(handle["pid"])
        if not same_start(handle["create_time"], proc.create_time()):
            return {}
        rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        return {"uptimeSeconds": int(datetime.now(timezone.utc).timestamp() - proc.create_time()), "rssBytes": rss}
    except (psutil.Error, KeyError, TypeError):
        return {}


def human_duration(seconds: int | None) -> str:
    """kubectl-style: 45s, 12m, 3h, 5d."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _observed_generation(instance: dict[str, Any], phase: str, generation: int, gateway_up: bool) -> int | None:
    """The spec generation the gateway has acted on. A running runtime reports the one it was started from (or
    was told about since, when the change did not touch its launch); a model with nothing running has nothing to
    apply, so a running gateway has observed its current spec; with no gateway, nothing is observed."""
    if phase in _LIVE_PHASES:
        return instance.get("generation") or None
    return generation if gateway_up else None


def _phase_conditions(phase: str, message: str, instance: dict[str, Any], obj: dict[str, Any],
                      observed: int | None) -> list[dict[str, Any]]:
    """Ready, Progressing and Failed, Kubernetes-style, from the phase the gateway recorded."""
    since = instance.get("phaseSince", obj["metadata"].get("creationTimestamp"))
    base = {"lastTransitionTime": since, "observedGeneration": observed}
    ready = {"type": "Ready", **base, "status": "True" if phase == "Ready" else "False",
             "reason": "GatewayDown" if phase == "Unknown" else phase, "message": message}
    if phase == "Starting":
        elapsed = age(since)
        progressing = {"type": "Progressing", **base, "status": "True", "reason": "Loading",
                       "message": f"loading for {elapsed}: {message}" if elapsed != "<unknown>" else message}
    elif phase in ("Draining", "Stopping"):
        progressing = {"type": "Progressing", **base, "status": "True", "reason": phase, "message": message}
    else:
        progressing = {"type": "Progressing", **base, "status": "False", "reason": "Settled",
                       "message": f"{phase}, nothing under way"}
    failure = instance.get("lastFailure") or {}
    if phase == "Failed":
        failed = {"type": "Failed", **base, "status": "True", "reason": failure.get("reason", "Failed"),
                  "message": failure.get("message", message)}
    else:
        last = (f"last failure {failure.get('reason')} at {failure.get('time')}: {failure.get('message')}"
                if failure else "no failure recorded")
        failed = {"type": "Failed", **base, "status": "False", "reason": "NotFailed", "message": last}
    conditions = [ready, progressing, failed]
    refusal = instance.get("refusal") or {}
    if refusal.get("reason") == "InsufficientMemory":
        conditions.append({"type": "InsufficientMemory", **base, "lastTransitionTime": refusal.get("time"),
                           "status": "True", "reason": "InsufficientMemory", "message": refusal.get("message", "")})
    return conditions


def _available_condition(artifact: dict[str, Any] | None, obj: dict[str, Any], observed: int | None) -> dict[str, Any]:
    condition = {"type": "Available", "lastTransitionTime": obj["metadata"].get("creationTimestamp"),
                 "observedGeneration": observed}
    if artifact is None:
        source = obj["spec"]["source"]
        where = source.get("path") or source.get("hf", {}).get("repo")
        return {**condition, "status": "False", "reason": "NotFound",
                "message": f"weights not found: {where} (not in the HF cache or not on disk)"}
    if artifact.get("problem"):
        return {**condition, "status": "False", "reason": "Unreadable", "message": artifact["problem"]}
    return {**condition, "status": "True", "reason": "Found", "message": artifact["path"]}


def _summary(available: dict[str, Any], obj: dict[str, Any], phase: str) -> str:
    """The one word for a model's state: its phase, unless it cannot run at all (NotFound, Unreadable, Disabled).

    Computed once, into the view, so that every reader (``athanor get``'s STATUS column, the admin API's
    ``status.summary``, the TUI) says the same word, rather than the API's phase ``Standby`` where ``get`` says
    ``Unreadable``."""
    if available["status"] != "True":
        return available["reason"]
    if obj["spec"].get("residency") == "disabled":
        return "Disabled"
    return phase


def display_status(view: dict[str, Any]) -> str:
    """The one word a table shows (``status.summary``)."""
    return view["status"]["summary"]


def age(timestamp: Any, now: datetime | None = None) -> str:
    """How long ago an ISO timestamp was, kubectl-style."""
    if not isinstance(timestamp, str):
        return "<unknown>"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    return human_duration(int(((now or datetime.now(timezone.utc)) - then).total_seconds()))


def human_bytes(size: int | None) -> str:
    if not size:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


def human_count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def source_text(source: dict[str, Any]) -> str:
    if "hf" in source:
        hf = source["hf"]
        text = hf["repo"] + (f":{hf['file']}" if hf.get("file") else "")
        return text + (f"@{hf['revision']}" if hf.get("revision") else "")
    return source["path"]


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, three spaces apart, like kubectl."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
