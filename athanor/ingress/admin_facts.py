"""What the admin API says about the daemon's machine and each model beyond the stored state: this machine's CPU,
load and memory (with the budget a model is judged against), each model's memory estimate and band, and the CPU
and resident memory of each live runtime's process tree.

A TUI asks for these every second, so each is cheap on a repeat: the CPU's name is read once, memory at most once
a second, estimates once per version of the models document (``athanor fit``'s ``estimate_model``, which reads
file sizes), and a runtime's process tree at most every ``PROCESS_TTL_S``. Everything here may touch the disk or
/proc: callers run it in a thread, off the event loop, and the caches are locked for that.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from athanor import fit
from athanor.managers.base import same_start
from athanor.quantities import parse_budget

MEMORY_TTL_S = 1.0
PROCESS_TTL_S = 0.5  # two polls closer than this share one sample of a runtime's processes


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (an Apple chip's name on a Mac: "Apple M2 Pro"), or the architecture when the system
    does not say."""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return out
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpu": cpu_name(), "cores": os.cpu_count() or 1, "load": [round(x, 2) for x in load]}


class MemoryCache:
    """This machine's memory (``fit.machine_memory``: vm_stat on a Mac), measured at most once a second."""

    def __init__(self, ttl: float = MEMORY_TTL_S):
        self._ttl = ttl
        self._lock = threading.Lock()
        self._at = -ttl
        self._memory: fit.Memory | None = None

    def get(self) -> fit.Memory:
        with self._lock:
            now = time.monotonic()
            if self._memory is None or now - self._at >= self._ttl:
                self._memory, self._at = fit.machine_memory(), now
            return self._memory


def memory_view(memory: fit.Memory, residency: dict[str, Any]) -> dict[str, Any]:
    """``budgetBytes``: what a model can take now, available less the OS's headroom (``fit.band`` judges every
    estimate against it); ``residencyBudgetBytes``: what all loaded models may hold together under ``memory``
    residency (None under ``single``)."""
    room = fit.headroom(memory.total)
    residency_budget = None
    if residency.get("policy") == "memory":
        try:
            residency_budget = parse_budget(residency.get("budget", "80%"), memory.total)
        except ValueError:
            residency_budget = None
    return {"totalBytes": memory.total, "availableBytes": memory.available,
            "usedBytes": max(memory.total - memory.available, 0), "budgetBytes": max(memory.available - room, 0),
            "headroomBytes": room, "residencyBudgetBytes": residency_budget}


class DaemonRecord:
    """This daemon's record in state.json (its listen and admin addresses, as ``listener.py`` wrote them), parsed
    again only when the file changed: it also holds the event log, a few hundred events to parse."""

    def __init__(self, state: Any):  # the store's state file (``Store.state``)
        self._state = state
        self._lock = threading.Lock()
        self._stamp: object = None
        self._record: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        """The record if it is this process's, else {} (not written yet, or unreadable)."""
        try:
            st = os.stat(self._state.path)
            stamp: object = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return {}
        with self._lock:
            if stamp != self._stamp:
                try:
                    record = self._state.load().get("daemon") or {}
                except Exception:  # noqa: BLE001 - a broken state file: the facts fall back to the request's socket
                    record = {}
                self._stamp, self._record = stamp, record if record.get("pid") == os.getpid() else {}
            return self._record


class FitCache:
    """Each model's estimate, computed once per version of the models document (the controller keeps one dict per
    version, so its identity says whether anything an estimate reads, a preset or a draft model, changed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._doc: object = None
        self._estimates: dict[str, fit.Estimate] = {}

    def fit(self, doc: dict[str, Any], name: str, memory: fit.Memory) -> dict[str, Any] | None:
        """``{"band", "bytes", "context"}`` for model ``name`` of ``doc``; band ``unknown`` (bytes and context 0)
        when its weights are not on disk; None when the estimate cannot be made (a broken preset)."""
        obj = doc["models"].get(name)
        if obj is None:
            return None
        with self._lock:
            if doc is not self._doc:
                self._doc, self._estimates = doc, {}
            estimate = self._estimates.get(name)
        if estimate is None:
            try:
                estimate = fit.estimate_model(doc, obj)
            except Exception:  # noqa: BLE001 - any bad metadata or preset: the view goes on without a fit
                return None
            with self._lock:
                if doc is self._doc:
                    self._estimates[name] = estimate
        if not obj.get("artifact"):
            return {"band": "unknown", "bytes": 0, "context": 0}
        return {"band": fit.band(estimate.total, memory), "bytes": estimate.total, "context": estimate.context}


@dataclass
class _Tree:
    """One runtime incarnation's processes, kept between samples: ``cpu_percent`` measures since its last call."""

    root: Any  # psutil.Process
    children: dict[int, Any]
    sampled_at: float = -1.0
    last: dict[str, Any] | None = None


class ProcessSampler:
    """CPU% and resident memory of each live runtime's process tree (the runtime and what it started: the MLX
    guard's server, a wrapper's child), one ``psutil.Process`` per process of the incarnation so each reading is
    the CPU used since the one before. A process's first reading is its average since it started."""

    def __init__(self, ttl: float = PROCESS_TTL_S):
        self._ttl = ttl
        self._lock = threading.Lock()
        self._trees: dict[str, tuple[tuple[int, float], _Tree]] = {}

    def sample(self, name: str, handle: dict[str, Any] | None) -> dict[str, Any] | None:
        """``{"cpuPercent", "rssBytes"}`` of model ``name``'s runtime (``handle``: its manager's handle), or None
        when it has no process that is still the one its handle names."""
        import psutil

        try:
            key = (int(handle["pid"]), float(handle["create_time"]))  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            return None
        with self._lock:
            held = self._trees.get(name)
            if held is None or held[0] != key:
                try:
                    root = psutil.Process(key[0])
                    if not same_start(key[1], root.create_time()):
                        return None
                except psutil.Error:
                    self._trees.pop(name, None)
                    return None
                held = self._trees[name] = (key, _Tree(root, {}))
            tree = held[1]
            now = time.monotonic()
            if tree.last is not None and now - tree.sampled_at < self._ttl:
                return tree.last
            try:
                tree.last = self._read(tree)
            except psutil.Error:  # the runtime is gone: its next incarnation gets a tree of its own
                self._trees.pop(name, None)
                return None
            tree.sampled_at = now
            return tree.last

    def forget_except(self, names: set[str]) -> None:
        """Drop the trees of models with no live runtime now."""
        with self._lock:
            for name in set(self._trees) - names:
                del self._trees[name]

    @staticmethod
    def _read(tree: _Tree) -> dict[str, Any]:
        import psutil

        cpu = _cpu(tree.root, fresh=tree.last is None)
        rss = tree.root.memory_info().rss
        seen: dict[int, Any] = {}
        for child in tree.root.children(recursive=True):
            kept = tree.children.get(child.pid)
            proc = kept if kept is not None and kept.is_running() else child
            try:
                cpu += _cpu(proc, fresh=proc is not kept)
                rss += proc.memory_info().rss
            except psutil.Error:
                continue  # it ended between the listing and the reading
            seen[child.pid] = proc
        tree.children = seen
        return {"cpuPercent": round(cpu, 1), "rssBytes": rss}


def _cpu(proc: Any, fresh: bool) -> float:
    """CPU% of ``proc`` since the last reading; for a process not read before, its average since it started."""
    if not fresh:
        return float(proc.cpu_percent(None))
    times = proc.cpu_times()
    proc.cpu_percent(None)  # the reference the next reading measures from
    alive = max(time.time() - proc.create_time(), 1e-3)
    return 100.0 * (times.user + times.system) / alive
