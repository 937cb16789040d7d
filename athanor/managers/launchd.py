"""launchd: each model's runtime and the ingress as user agents, driven with ``launchctl``.

Rendering: ``templates/plists/{model,ingress}.plist.j2``, labels ``dev.athanor.model.NAME`` and
``dev.athanor.ingress``. Model jobs carry ``KeepAlive {SuccessfulExit: false}``, so launchd restarts a crash and
leaves a clean stop stopped; ``ProcessType Interactive`` (``Background`` is throttled hard enough to slow Metal
decoding several times over).

Where the plists live. Only the gateway's goes in ``~/Library/LaunchAgents`` (or ``launchd.agentsDir``), where
launchd loads it at every login. launchd would load a model's plist there at login too, and its KeepAlive would
start every model at once, untracked; model plists go in ``$ATHANOR_HOME/launchd`` instead (``bootstrap`` takes
any path), and are loaded only when the gateway swaps them in.

The verbs, and the behaviour of launchctl they have to live with:

- swap in: ``enable`` (only when the label is on the disabled list: on macOS ``enable`` records an override for
  good) then ``bootstrap``. A job booted out a moment ago may still be on its way out, and ``bootstrap`` then
  fails with 5 (Input/output error, which also means disabled or missing): wait until ``print`` no longer knows
  the label (bounded), and retry a 5 a few times. A start that fails after ``bootstrap`` boots the job out again,
  or KeepAlive would respawn it forever.
- swap out: ``bootout``, which returns before the job is gone, so ``print`` is polled until the label is
  unknown. ``bootout`` of an unloaded job exits 3 and an unknown service 113: both mean there is nothing to stop.
- observe: ``print``, whose output is not an API; only ``state``, ``pid``, ``runs`` and the last exit are read,
  each line on its own, and anything else is ignored.
- the domain is ``gui/UID`` whenever that domain exists (a login session), else ``user/UID`` (SSH only).

launchd has no start limit: a runtime that keeps crashing is restarted every ``ThrottleInterval`` forever. The
controller stops that: every crash it sees counts a failure and boots the job out, and ``CRASH_LIMIT`` failures
leave the model Failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from athanor.errors import AthanorError, RuntimeNotFoundError
from athanor.managers.base import LABEL_PREFIX, Handle, Job, JobState
from athanor.managers.shared import ExternalManager, create_time, said, write_if_changed
from athanor.managers.templates import render
from athanor.paths import ensure_private_dir
from athanor.timestamps import utc_timestamp

NOT_LOADED = (3, 113)  # bootout of an unloaded job; an unknown service
BUSY = 5  # bootstrap of a job still loaded (or disabled, or a missing plist)
GONE_WAIT_S = 20.0
BOOTSTRAP_TRIES = 8
# XML carries no other control character, and its parsers read a CR as an LF (XML 1.0, 2.11): plistlib does,
# libplist does not, so a CR would mean what the parser decides.
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\ufffe\uffff]")


class LaunchctlError(AthanorError):
    """launchctl refused a request; the message carries its words."""


def render_plist(job: Job) -> bytes:
    """The job's plist (pure: the same job gives the same bytes). XML cannot hold most control characters,
    even escaped: a value with one is refused rather than written broken."""
    for value in (*job.argv, *(v for pair in job.env for v in pair), job.workdir, job.log_path):
        if _XML_FORBIDDEN.search(value):
            raise AthanorError(f"{job.label}: {value!r} holds a control character a plist cannot carry")
    return render("plists", f"{job.kind}.plist.j2", escape=True, job=job)


def parse_print(text: str) -> dict[str, object]:
    """The facts athanor reads from ``launchctl print``: state, pid, runs, exit code (negative: a signal)."""
    facts: dict[str, object] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if not sep:
            continue
        if key == "state" and "state" not in facts:
            facts["state"] = value.strip()
        elif key == "pid" and value.strip().isdigit():
            facts["pid"] = int(value)
        elif key == "runs" and value.strip().isdigit():
            facts["runs"] = int(value)
        elif key == "last exit code":
            code = value.split(":")[0].strip()
            if re.fullmatch(r"-?\d+", code):
                facts["exit_code"] = int(code)
        elif key == "last terminating signal":
            number = value.rsplit(":", 1)[-1].strip()
            if number.isdigit():
                facts["exit_code"] = -int(number)
    return facts


class LaunchdManager(ExternalManager):
    name = "launchd"

    def __init__(self, agents_dir: Path, directory: Path):
        self.agents_dir = agents_dir  # ~/Library/LaunchAgents (or launchd.agentsDir): the gateway's plist
        self.directory = directory  # $ATHANOR_HOME/launchd: the models' plists, loaded only by the gateway
        self._domain: str | None = None

    # ------------------------------------------------------------------ rendering

    def plist_path(self, job: Job) -> Path:
        return (self.agents_dir if job.kind == "ingress" else self.directory) / f"{job.label}.plist"

    def files(self, job: Job) -> dict[Path, bytes]:
        return {self.plist_path(job): render_plist(job)}

    # ------------------------------------------------------------------ the verbs

    async def start(self, job: Job) -> Handle:
        return await asyncio.to_thread(self._start, job)

    def _start(self, job: Job, *, write: bool = True) -> Handle:
        path = self.plist_path(job)
        if write:
            write_if_changed(path, render_plist(job))
        ensure_private_dir(Path(job.log_path).parent)  # launchd opens the log, but makes no directory for it
        target = self._target(job.label)
        # Still loaded: on its way out after a bootout a moment ago, or left by a gateway that is gone. The label is
        # ours either way: boot it out, and wait until it is gone.
        self._run("bootout", target)
        self._wait_gone(target, GONE_WAIT_S)
        if f'"{job.label}" => disabled' in self._run("print-disabled", self.domain()).stdout:
            self._launchctl("enable", target)
        for attempt in range(BOOTSTRAP_TRIES):
            result = self._run("bootstrap", self.domain(), str(path))
            if result.returncode == 0:
                break
            if result.returncode != BUSY or attempt == BOOTSTRAP_TRIES - 1:
                raise LaunchctlError(f"launchctl bootstrap {self.domain()} {path}: {said(result)}")
            self._wait_gone(target, 1.0 + attempt)
        try:
            facts = self._wait_running(target, job.stop_timeout_s)
        except LaunchctlError:
            self._stop({"domain": self.domain(), "label": job.label}, 1.0)  # else KeepAlive respawns it forever
            raise
        pid = facts["pid"]
        assert isinstance(pid, int)
        return {"manager": self.name, "label": job.label, "domain": self.domain(), "plist": str(path), "pid": pid,
                "create_time": create_time(pid), "runs": facts.get("runs", 1), "log_path": job.log_path,
                "started_at": utc_timestamp()}

    async def stop(self, handle: Handle, grace: float) -> int | None:
        return await asyncio.to_thread(self._stop, handle, grace)

    def _stop(self, handle: Handle, grace: float) -> int | None:
        target = f"{handle['domain']}/{handle['label']}"
        result = self._run("bootout", target)
        if result.returncode not in (0, *NOT_LOADED):
            raise LaunchctlError(f"launchctl bootout {target}: {said(result)}")
        last = self._wait_gone(target, grace + GONE_WAIT_S)
        return last.get("exit_code") if isinstance(last.get("exit_code"), int) else None  # type: ignore[return-value]

    async def observe(self, handle: Handle) -> JobState:
        return await asyncio.to_thread(self._observe, handle)

    def _observe(self, handle: Handle) -> JobState:
        target = f"{handle['domain']}/{handle['label']}"
        result = self._run("print", target)
        if result.returncode != 0:
            return JobState(False, detail="not loaded")
        facts = parse_print(result.stdout)
        pid = facts.get("pid") if isinstance(facts.get("pid"), int) else None
        runs = facts.get("runs", 1)
        running = facts.get("state") == "running" and pid == handle["pid"]
        exit_code = facts.get("exit_code") if isinstance(facts.get("exit_code"), int) else None
        detail = f"state {facts.get('state', '?')}, runs {runs}"
        return JobState(running, pid, exit_code, max(0, int(runs) - int(handle.get("runs", 1))), detail)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ installing the gateway

    def installed(self, job: Job) -> bool:
        return self.plist_path(job).exists()

    async def install(self, job: Job) -> str:
        """Have ``job`` loaded from a current plist: ``created``, ``configured`` (reloaded with a changed plist)
        or ``unchanged``. A job that starts at load (the ingress) also starts at every login."""
        return await asyncio.to_thread(self._install, job)

    def _install(self, job: Job) -> str:
        path = self.plist_path(job)
        existed = path.exists()
        target = self._target(job.label)
        loaded = self._run("print", target).returncode == 0
        changed = write_if_changed(path, render_plist(job))
        if loaded and not changed:
            return "unchanged"
        if loaded:
            self._stop({"domain": self.domain(), "label": job.label}, job.stop_timeout_s)
        self._start(job)
        return "configured" if existed else "created"

    async def start_job(self, job: Job) -> None:
        """Load an installed job from its plist as it is (``athanor up`` of an installed gateway)."""
        target = self._target(job.label)
        if await asyncio.to_thread(lambda: self._run("print", target).returncode) != 0:
            await asyncio.to_thread(lambda: self._start(job, write=False))

    async def stop_job(self, job: Job) -> None:
        """Stop ``job`` by its label (the gateway's own job, whose handle nobody records)."""
        await self.stop({"domain": await asyncio.to_thread(self.domain), "label": job.label}, job.stop_timeout_s)

    async def job_state(self, job: Job) -> JobState:
        """What runs under ``job``'s label now, whoever started it."""
        return await self.observe({"domain": await asyncio.to_thread(self.domain), "label": job.label, "pid": -1})

    async def uninstall(self) -> list[str]:
        """Boot out and remove every job athanor created here: its plists, and nothing else."""
        return await asyncio.to_thread(self._uninstall)

    def _uninstall(self) -> list[str]:
        """The gateway first (so it does not start models meanwhile), then every model job: loaded ones, found in
        the domain even when their plist is gone, and every plist of ours."""
        plists = {p.name.removesuffix(".plist"): p for d in (self.agents_dir, self.directory) if d.is_dir()
                  for p in d.glob(f"{LABEL_PREFIX}*.plist")}
        present = shutil.which("launchctl") is not None  # without it (not macOS) nothing can be loaded
        loaded = self._loaded_labels() if present else []
        labels = sorted(set(plists) | set(loaded), key=lambda label: (label != f"{LABEL_PREFIX}ingress", label))
        for label in labels:
            if present:
                self._stop({"domain": self.domain(), "label": label}, 10.0)
            if label in plists:
                plists[label].unlink()
        return labels

    def _loaded_labels(self) -> list[str]:
        """Our labels loaded in the domain (``print DOMAIN`` lists its services, one per line, label last)."""
        result = self._run("print", self.domain())
        if result.returncode != 0:
            return []
        found = []
        for line in result.stdout.splitlines():
            words = line.split()
            if words and words[-1].startswith(LABEL_PREFIX):
                found.append(words[-1])
        return sorted(set(found))

    # ------------------------------------------------------------------ launchctl

    def domain(self) -> str:
        """``gui/UID`` whenever the user has a login session, even when athanor runs over SSH: at the next login
        launchd loads the gateway's plist into that domain, and the jobs must be found there. ``user/UID`` only
        without one."""
        if self._domain is None:
            gui = f"gui/{os.getuid()}"
            self._domain = gui if self._run("print", gui).returncode == 0 else f"user/{os.getuid()}"
        return self._domain

    def _target(self, label: str) -> str:
        return f"{self.domain()}/{label}"

    def _wait_gone(self, target: str, timeout: float) -> dict[str, object]:
        """Poll ``print`` until launchd no longer knows ``target``; returns the last facts it gave."""
        deadline = time.monotonic() + timeout
        last: dict[str, object] = {}
        delay = 0.02
        while True:
            result = self._run("print", target)
            if result.returncode != 0:
                return last
            last = parse_print(result.stdout)
            if time.monotonic() >= deadline:
                raise LaunchctlError(f"{target} is still loaded {timeout:.0f} s after bootout ({last.get('state')})")
            time.sleep(delay)  # bootout completes after it returns
            delay = min(delay * 2, 0.5)

    def _wait_running(self, target: str, timeout: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            result = self._run("print", target)
            facts = parse_print(result.stdout) if result.returncode == 0 else {}
            if facts.get("state") == "running" and isinstance(facts.get("pid"), int):
                return facts
            if "exit_code" in facts:  # bootstrapped afresh, so it ran and ended already: KeepAlive would respawn
                # it every ThrottleInterval until the deadline, each run a load that fails again
                raise LaunchctlError(f"{target} exited at start (exit code {facts['exit_code']})")
            if time.monotonic() >= deadline:
                raise LaunchctlError(f"{target} did not start: {facts or said(result)}")
            time.sleep(delay)  # launchd spawns the job just after bootstrap returns
            delay = min(delay * 2, 0.2)

    def _launchctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self._run(*args)
        if result.returncode != 0:
            raise LaunchctlError(f"launchctl {' '.join(args)}: {said(result)}")
        return result

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        launchctl = shutil.which("launchctl")
        if launchctl is None:
            raise RuntimeNotFoundError("launchctl not found: launchd runs only on macOS; set the Gateway's "
                                       "serviceManager to process or systemd")
        return subprocess.run([launchctl, *args], capture_output=True, text=True, timeout=30)
