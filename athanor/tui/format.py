"""What the TUI's cells say, from the admin API's JSON: pure functions, no widgets, so tests and screens share them.

Anything the daemon does not report (an older daemon, a model that is not running) is "-", never an error.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from athanor.views import human_duration

DASH = "-"
COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "NAME"), ("runtime", "RUNTIME"), ("port", "PORT"), ("phase", "PHASE"), ("cpu", "CPU%"),
    ("rss", "RSS"), ("toks", "TOK/S"), ("fit", "FIT"), ("markers", "MARKERS"),
)
LIVE_PHASES = ("Starting", "Ready", "Draining", "Stopping")


def size(n: Any) -> str:
    """Bytes the way people read memory: 512M, 3.2G."""
    if not isinstance(n, (int, float)) or n < 0:
        return DASH
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{int(n)}B"


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def seconds_since(timestamp: Any, now: float | None = None) -> int | None:
    """Whole seconds since an ISO 8601 time the daemon wrote, or None when there is none."""
    if not isinstance(timestamp, str):
        return None
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return max(0, int((time.time() if now is None else now) - then))


def phase(model: dict[str, Any], now: float | None = None) -> str:
    """The phase, with the seconds it has been loading for while it starts."""
    value = _get(model, "status", "phase") or DASH
    if value == "Starting":
        ready = next((c for c in _get(model, "status", "conditions") or [] if c.get("type") == "Ready"), {})
        elapsed = seconds_since(ready.get("lastTransitionTime"), now)
        if elapsed is not None:
            return f"Starting {elapsed}s"
    return value


def markers(model: dict[str, Any], pi: bool = False) -> str:
    """``[pinned]``, ``[alias]``, ``[pi]`` (pi's provider lists it), ``[tuned]`` (preset overrides), ``[hidden]``."""
    spec = model.get("spec") or {}
    found = []
    if spec.get("residency") == "pinned":
        found.append("pinned")
    if spec.get("residency") == "disabled":
        found.append("disabled")
    if spec.get("aliases"):
        found.append("alias")
    if pi:
        found.append("pi")
    if spec.get("preset"):
        found.append("tuned")
    if spec.get("publish") is False:
        found.append("hidden")
    return " ".join(f"[{m}]" for m in found) or DASH


def row(model: dict[str, Any], tokens_per_second: float | None = None, now: float | None = None,
        pi: bool = False) -> dict[str, str]:
    """One model's cells, by column key (``pi``: pi's provider lists the model, from the store)."""
    status = model.get("status") or {}
    process = status.get("process") or {}
    cpu = process.get("cpuPercent")
    rss = process.get("rssBytes", status.get("rssBytes"))
    port = status.get("port") or _get(model, "spec", "port")
    return {
        "name": _get(model, "metadata", "name") or DASH,
        "runtime": _get(model, "spec", "runtime") or DASH,
        "port": str(port) if port else DASH,
        "phase": phase(model, now),
        "cpu": f"{cpu:.0f}" if isinstance(cpu, (int, float)) else DASH,
        "rss": size(rss) if rss is not None else DASH,
        "toks": f"{tokens_per_second:.1f}" if isinstance(tokens_per_second, (int, float)) else DASH,
        "fit": _get(status, "fit", "band") or DASH,
        "markers": markers(model, pi),
    }


def header(daemon: dict[str, Any] | None, target_listen: str | None, pid: int | None) -> str:
    """The header line: machine, memory, load, service manager, ingress address and uptime (from /daemon when the
    daemon has it; the record's address and pid otherwise)."""
    daemon = daemon or {}
    machine = daemon.get("machine") or {}
    memory = daemon.get("memory") or {}
    cpu = machine.get("cpu") or DASH
    cores = machine.get("cores")
    load = machine.get("load")
    used, total = memory.get("usedBytes"), memory.get("totalBytes")
    parts = [
        f"{cpu}" + (f" ({cores} cores)" if cores else ""),
        f"mem {size(used)}/{size(total)}",
        "load " + (" ".join(f"{x:.2f}" for x in load) if isinstance(load, list) and load else DASH),
        f"manager {daemon.get('serviceManager') or DASH}",
        f"ingress http://{daemon.get('listen') or target_listen}" if (daemon.get("listen") or target_listen) else
        f"ingress {DASH}",
        f"up {human_duration(int(up)) if isinstance(up := daemon.get('uptimeSeconds'), (int, float)) else DASH}",
    ]
    version = daemon.get("version")
    head = f"athanor {version}" if version else "athanor"
    return f"{head} pid {pid or DASH} | " + " | ".join(parts)


def event_line(event: dict[str, Any]) -> str:
    """One event for the feed: time, model, reason, message (load seconds where the daemon gives them)."""
    when = str(event.get("time", ""))[11:19] or DASH
    name = event.get("name") or event.get("kind") or DASH
    seconds = event.get("seconds")
    extra = f" ({seconds:.1f}s)" if isinstance(seconds, (int, float)) else ""
    return f"{when} {name} {event.get('reason', '')}{extra}: {event.get('message', '')}"
