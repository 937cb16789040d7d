"""The seam between the controller and whatever runs runtimes: the embedded supervisor, launchd, systemd, or a
Kubernetes cluster.

A ``Job`` describes one thing to run, a model's runtime or the ingress: what to execute, with which environment,
where its output goes, and how it is kept alive. Every manager reads that one description. launchd renders it as a
plist, systemd as a unit, and the embedded supervisor runs it directly. None of them decides policy. The
controller sees only ``ServiceManager``.

Handles are plain JSON objects that a manager made and alone reads (``{"manager": NAME, ...}``). They go into
state.json as they are, and a later daemon hands them back to the manager named in them, to adopt or to stop.

Anything that blocks (a subprocess call, a file write, a signal and the wait after it) runs in a worker thread, so
every coroutine here is safe to await on the event loop.

Processes on this machine (pids, signals, files in ATHANOR_HOME, loopback ports) are a property of the local
managers (``LocalManager``), not of the seam: a Kubernetes pod has none of them. What the controller needs to know
about where a job runs, it asks: ``local`` (may it check weights, binaries and ports here, and park slots in
ATHANOR_HOME?), ``endpoint`` (where does the job answer now?), ``prepared`` (the launch as this manager runs it)
and ``memory`` (the room models have, when it is not this machine's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from athanor.runtimes.launch import LOOPBACK

if TYPE_CHECKING:
    from athanor.fit import Memory
    from athanor.runtimes.launch import LaunchSpec

Handle = dict[str, Any]

LABEL_PREFIX = "dev.athanor."  # launchd labels: dev.athanor.ingress, dev.athanor.model.NAME
UNIT_PREFIX = "athanor-"  # systemd units: athanor-ingress.service, athanor-model-NAME.service
# How far two reads of one process's create time may differ. On Linux psutil adds /proc/stat's btime, an integer
# the kernel derives from the wall clock, which flips by a second when NTP adjusts the clock: a tighter bound lost
# track of running runtimes. A PID cannot come round again within a second and a half.
CREATE_TIME_TOLERANCE_S = 1.5


@dataclass(frozen=True)
class Job:
    """One thing a service manager runs. Frozen and made of plain values, so rendering it is a pure function."""

    kind: str  # "model" or "ingress"
    name: str  # the model's name (names are [a-z0-9._-]); "ingress" for the gateway
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # sorted: the same job renders to the same bytes
    workdir: str
    log_path: str
    stop_timeout_s: int = 10  # SIGTERM to SIGKILL
    throttle_s: int = 2  # at least this long between two starts by the manager itself
    socket: str | None = None  # a Unix socket argv listens on, cleared before a start (``LaunchSpec.socket``)

    @property
    def label(self) -> str:
        return f"{LABEL_PREFIX}{self.kind}" if self.kind == "ingress" else f"{LABEL_PREFIX}model.{self.name}"

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.kind}.service" if self.kind == "ingress" else f"{UNIT_PREFIX}model-{self.name}.service"

    @property
    def restart_always(self) -> bool:
        """The ingress is restarted whatever ends it; a model only after a crash, so a clean stop stays stopped."""
        return self.kind == "ingress"

    def environment(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True)
class JobState:
    """What a manager says about a job now."""

    running: bool
    pid: int | None = None
    exit_code: int | None = None  # of the last run; negative: killed by that signal
    restarts: int = 0  # starts the manager made on its own (KeepAlive, Restart=)
    detail: str = ""  # the manager's own words, for describe


class ServiceManager(Protocol):
    name: str
    local: bool  # runs jobs as processes on this machine: preflight, parking and pids apply

    def endpoint(self, handle: Handle, launch: LaunchSpec) -> tuple[str, int] | None:
        """Where the job answers now, as (host, port); None while that is not known yet (a pod not yet placed)."""

    def prepared(self, launch: LaunchSpec) -> LaunchSpec:
        """The launch as this manager runs it (a cluster's runtimes take its key, not a per-start one)."""

    def memory(self) -> Memory | None:
        """The memory models may use, when it is not this machine's (None: this machine's)."""

    async def log_tail(self, handle: Handle, lines: int) -> list[str]:
        """The last ``lines`` lines the job wrote (a file here; a pod's log in a cluster)."""

    async def strays(self, known: list[Handle]) -> list[Handle]:
        """Jobs of models that run under this manager and that none of ``known`` names (none for the local
        managers, whose every job a record names)."""

    def files(self, job: Job) -> dict[Path, bytes]:
        """The files this job needs, rendered (pure: the same job gives the same bytes); none for some managers."""

    async def start(self, job: Job) -> Handle:
        """Write the job's files if they changed, load it, run it; the handle names the process that runs now."""

    async def stop(self, handle: Handle, grace: float) -> int | None:
        """Stop the job for good (a clean stop is not restarted) and return its exit code if known. Safe on a job
        that is already gone and when repeated."""

    async def observe(self, handle: Handle) -> JobState:
        """The job as the manager sees it now. ``running`` is about the process the handle names: a job the
        manager restarted on its own runs another process, and is reported not running."""

    async def wait_exit(self, handle: Handle, timeout: float) -> bool:
        """Whether the handle's process is gone within ``timeout`` seconds."""

    async def housekeeping(self, handles: list[Handle]) -> None:
        """Periodic care: collect exited children, rotate logs. Called by the controller's monitor."""

    def forget(self, handle: Handle) -> None:
        """The caller has recorded the end of this handle's process; drop what is kept about it."""


class LocalManager:
    """What every manager of processes on this machine shares: the runtime answers on loopback at its launch's
    port, the launch runs as built, and the machine's memory is the limit."""

    local = True

    def endpoint(self, handle: Handle, launch: LaunchSpec) -> tuple[str, int] | None:
        return LOOPBACK, launch.port

    def prepared(self, launch: LaunchSpec) -> LaunchSpec:
        return launch

    def memory(self) -> Memory | None:
        return None

    async def strays(self, known: list[Handle]) -> list[Handle]:
        return []

    async def log_tail(self, handle: Handle, lines: int) -> list[str]:
        from athanor.managers import logs

        return await asyncio.to_thread(logs.tail, Path(handle["log_path"]), lines)


def located(manager: ServiceManager, handle: Handle, launch: LaunchSpec) -> LaunchSpec | None:
    """``launch`` at the address its job answers on now (None while its manager does not know it yet)."""
    address = manager.endpoint(handle, launch)
    if address is None or address == (launch.host, launch.port):
        return None if address is None else launch
    return replace(launch, host=address[0], port=address[1])


def same_start(recorded: float, observed: float) -> bool:
    """Whether a process's create time (``observed``) is the one recorded with its PID: a PID alone is not an
    identity (the kernel reuses them), so handles and the daemon's record carry the create time too."""
    return abs(recorded - observed) <= CREATE_TIME_TOLERANCE_S


def sorted_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(env.items()))
