"""systemd --user: each model's runtime and the ingress as user units, driven with ``systemctl --user``.

Rendering: ``templates/systemd/{model,ingress}.service.j2`` into ``$XDG_CONFIG_HOME/systemd/user``
(``athanor-model-NAME.service``, ``athanor-ingress.service``). A unit file is not markup, so every value is quoted
here by systemd's own rules before it reaches the template: each ``ExecStart`` argument in double quotes with
C-style escapes, ``%`` (specifiers) doubled, ``$`` (variable expansion) doubled in ``ExecStart``; each
``Environment=`` assignment quoted the same way. Model units restart on failure only (a clean stop stays
stopped), with the start limit in ``[Unit]``, where systemd reads it; ``KillMode=mixed`` sends SIGTERM to the
runtime and SIGKILL to anything left after ``TimeoutStopSec``.

The verbs: ``daemon-reload`` after writing units; ``reset-failed`` then ``start`` (a unit stopped by its start limit
stays failed otherwise); ``stop --no-block``, then ``kill --signal=SIGKILL`` once the caller's grace is over (a
blocking ``stop`` would give a hung runtime the unit's whole ``TimeoutStopSec``, whatever grace the controller
chose), polling ``show`` until the unit is down; ``show`` for ``MainPID``, ``ActiveState``, ``SubState``,
``Result``, ``NRestarts`` and the main process's exit.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path

from athanor.errors import AthanorError, RuntimeNotFoundError
from athanor.managers.base import UNIT_PREFIX, Handle, Job, JobState
from athanor.managers.shared import ExternalManager, create_time, said, write_if_changed
from athanor.managers.templates import render
from athanor.paths import ensure_private_dir
from athanor.timestamps import utc_timestamp

START_LIMIT_BURST = 5  # a model unit that fails this often in the interval is left failed by systemd itself
START_LIMIT_INTERVAL_S = 60
SHOW = ("MainPID", "ActiveState", "SubState", "Result", "NRestarts", "ExecMainCode", "ExecMainStatus",
        "NeedDaemonReload")
_CLD_EXITED = "1"  # ExecMainCode: the main process exited (its status is an exit code), else it was killed
KILLED_WAIT_S = 30.0  # after SIGKILL to every process of the unit, how long systemd may take to call it stopped
_DOWN = ("inactive", "failed")
_UNQUOTABLE = re.compile("[\x00\n\r]")
_UNRUNNABLE = re.compile("[\"'\\\\\x00-\x1f\x7f]")  # systemd refuses such an executable path ("special characters")


class SystemctlError(AthanorError):
    """systemctl refused a request; the message carries its words."""


def quote(value: str, *, expand: bool = False) -> str:
    """One word for a unit file, double-quoted: C escapes for backslash, quote and control characters, ``%%`` for
    a literal ``%``, and with ``expand`` (``ExecStart``, where ``$VAR`` is expanded) ``$$`` for a literal ``$``."""
    if _UNQUOTABLE.search(value):
        raise AthanorError(f"{value!r} holds a newline or NUL, which a unit file cannot carry")
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and expand:
            out.append("$$")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _path(value: str) -> str:
    """A path setting (``WorkingDirectory=``, ``append:``), which takes no quotes: specifiers doubled. systemd
    strips the white space a value ends with, so a path ending in one cannot be written."""
    if _UNQUOTABLE.search(value):
        raise AthanorError(f"{value!r} holds a newline or NUL, which a unit file cannot carry")
    if value != value.rstrip():
        raise AthanorError(f"{value!r} ends with white space, which a unit file cannot carry in a path")
    return value.replace("%", "%%")


def _exec_start(argv: tuple[str, ...]) -> str:
    """``@PATH ARGV0 ARGS...``: systemd expands ``$`` in the argv (argv[0] too) but never in the executable's
    path, so the path is written apart, without ``$$``, and the argv with it."""
    executable = argv[0]
    if _UNRUNNABLE.search(executable):
        raise AthanorError(f"{executable!r}: systemd cannot run an executable whose path holds a quote, a backslash "
                           "or a control character; move it, or link it from a plain path")
    return "@" + quote(executable) + " " + " ".join(quote(arg, expand=True) for arg in argv)


def render_unit(job: Job) -> bytes:
    """The job's unit (pure: the same job gives the same bytes)."""
    return render("systemd", f"{job.kind}.service.j2", escape=False, job=job,
                  exec_start=_exec_start(job.argv),
                  workdir=_path(job.workdir), log_path=_path(job.log_path),
                  environment=[quote(f"{key}={value}") for key, value in job.env],
                  start_limit_burst=START_LIMIT_BURST, start_limit_interval_s=START_LIMIT_INTERVAL_S)


def parse_show(text: str) -> dict[str, str]:
    facts = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            facts[key.strip()] = value.strip()
    return facts


class SystemdManager(ExternalManager):
    name = "systemd"

    def __init__(self, directory: Path):
        self.directory = directory  # $XDG_CONFIG_HOME/systemd/user

    def unit_path(self, job: Job) -> Path:
        return self.directory / job.unit

    def files(self, job: Job) -> dict[Path, bytes]:
        return {self.unit_path(job): render_unit(job)}

    async def start(self, job: Job) -> Handle:
        return await asyncio.to_thread(self._start, job)

    def _start(self, job: Job) -> Handle:
        written = write_if_changed(self.unit_path(job), render_unit(job))
        if written or self._show(job.unit).get("NeedDaemonReload") == "yes":  # else systemd runs what it cached
            self._systemctl("daemon-reload")
        ensure_private_dir(Path(job.log_path).parent)  # systemd opens append: logs, but makes no directory
        self._run("reset-failed", job.unit)  # a unit its start limit stopped would refuse to start
        self._systemctl("start", job.unit)
        facts = self._show(job.unit)
        pid = int(facts.get("MainPID", "0") or 0)
        if not pid:
            # A runtime that exited at once: Restart=on-failure would respawn it every RestartSec, for no gateway
            # (the caller has no handle to stop), and the next start's reset-failed lifts the start limit.
            self._stop({"unit": job.unit}, 1.0)
            raise SystemctlError(f"{job.unit} did not start: {facts.get('ActiveState')}/{facts.get('SubState')} "
                                 f"({facts.get('Result')}); see 'athanor logs {job.name}'")
        return {"manager": self.name, "unit": job.unit, "pid": pid, "create_time": create_time(pid),
                "restarts": int(facts.get("NRestarts", "0") or 0), "log_path": job.log_path,
                "started_at": utc_timestamp()}

    async def stop(self, handle: Handle, grace: float) -> int | None:
        return await asyncio.to_thread(self._stop, handle, grace)

    def _stop(self, handle: Handle, grace: float) -> int | None:
        """SIGTERM (the unit's stop), ``grace`` seconds, then SIGKILL to every process of the unit. The unit's
        ``TimeoutStopSec`` still bounds the grace from above: systemd kills at that point whatever the caller
        asked."""
        unit = handle["unit"]
        result = self._run("stop", "--no-block", unit)  # queues the stop job and returns
        if result.returncode == 5:  # the unit is not loaded at all, so nothing runs
            return None
        if result.returncode != 0:
            raise SystemctlError(f"systemctl --user stop {unit}: {said(result)}")
        facts = self._wait_down(unit, grace)
        if facts is None:
            self._run("kill", "--signal=SIGKILL", unit)  # an error here: it ended meanwhile (checked below)
            facts = self._wait_down(unit, KILLED_WAIT_S)
            if facts is None:
                raise SystemctlError(f"{unit} is still running {KILLED_WAIT_S:.0f} s after SIGKILL")
        return _exit_code(facts)

    def _wait_down(self, unit: str, timeout: float) -> dict[str, str] | None:
        """The unit's facts once it is inactive or failed (its stop job done), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            facts = self._show(unit)
            if facts.get("ActiveState") in _DOWN:
                return facts
            if time.monotonic() >= deadline:
                return None
            time.sleep(delay)  # polling systemd for the end of a stop, bounded by the caller's grace
            delay = min(delay * 2, 0.1)

    async def observe(self, handle: Handle) -> JobState:
        return await asyncio.to_thread(self._observe, handle)

    def _observe(self, handle: Handle) -> JobState:
        facts = self._show(handle["unit"])
        pid = int(facts.get("MainPID", "0") or 0) or None
        active = facts.get("ActiveState") == "active" and facts.get("SubState") == "running"
        restarts = max(0, int(facts.get("NRestarts", "0") or 0) - int(handle.get("restarts", 0)))
        detail = f"{facts.get('ActiveState', '?')}/{facts.get('SubState', '?')}, result {facts.get('Result', '?')}"
        return JobState(active and pid == handle["pid"], pid, _exit_code(facts), restarts, detail)


    def reload_files(self) -> None:
        """After ``apply`` rewrote units: systemd reads unit files only on daemon-reload. A user manager that
        does not answer (no login session) is not an error here; ``athanor install`` says what to do."""
        self._run("daemon-reload")

    # ------------------------------------------------------------------ installing the gateway

    def installed(self, job: Job) -> bool:
        return self.unit_path(job).exists()

    async def install(self, job: Job) -> str:
        """Have ``job`` enabled and running from a current unit: ``created``, ``configured`` (restarted with a
        changed unit) or ``unchanged``. Enabled, the ingress starts with the user's manager (at login, or at boot
        with lingering on)."""
        return await asyncio.to_thread(self._install, job)

    def _install(self, job: Job) -> str:
        path = self.unit_path(job)
        existed = path.exists()
        changed = write_if_changed(path, render_unit(job))
        if changed:
            self._systemctl("daemon-reload")
        self._systemctl("enable", job.unit)
        active = self._run("is-active", job.unit).stdout.strip() == "active"
        if active and not changed:
            return "unchanged"
        ensure_private_dir(Path(job.log_path).parent)
        self._systemctl("restart" if active else "start", job.unit)
        return "configured" if existed else "created"

    async def start_job(self, job: Job) -> None:
        """Start an installed unit as it is (``athanor up`` of an installed gateway)."""
        await asyncio.to_thread(self._systemctl, "start", job.unit)

    async def stop_job(self, job: Job) -> None:
        await self.stop({"unit": job.unit}, job.stop_timeout_s)

    async def job_state(self, job: Job) -> JobState:
        """What runs under ``job``'s unit now, whoever started it."""
        return await self.observe({"unit": job.unit, "pid": -1})

    async def uninstall(self) -> list[str]:
        """Stop, disable and remove every unit athanor created here, and nothing else."""
        return await asyncio.to_thread(self._uninstall)

    def _uninstall(self) -> list[str]:
        """The gateway first (so it does not start models meanwhile), then every model unit: loaded ones, found by
        systemd even when their file is gone, and every unit file of ours."""
        files = {p.name: p for p in self.directory.glob(f"{UNIT_PREFIX}*.service")} if self.directory.is_dir() else {}
        if shutil.which("systemctl") is None:  # without it (not Linux) nothing can be loaded: the files only
            for path in files.values():
                path.unlink()
            return sorted(files)
        units = sorted(set(files) | set(self._loaded_units()), key=lambda u: (u != f"{UNIT_PREFIX}ingress.service", u))
        for unit in units:
            stopped = self._run("stop", unit)
            if stopped.returncode not in (0, 5):  # 5: not loaded
                raise SystemctlError(f"systemctl --user stop {unit}: {said(stopped)}")
            if unit in files:
                self._run("disable", unit)  # removes the default.target.wants link of the gateway's unit
                files[unit].unlink()
            self._run("reset-failed", unit)
        if units:
            self._systemctl("daemon-reload")
        return units

    def _loaded_units(self) -> list[str]:
        """Our units systemd knows (none when no user manager answers: then none can run either)."""
        result = self._run("list-units", "--all", "--plain", "--no-legend", f"{UNIT_PREFIX}*")
        if result.returncode != 0:
            return []
        return sorted({line.split()[0] for line in result.stdout.splitlines() if line.strip()})

    # ------------------------------------------------------------------ systemctl

    def _show(self, unit: str) -> dict[str, str]:
        result = self._run("show", unit, "-p", ",".join(SHOW))
        if result.returncode != 0:
            raise SystemctlError(f"systemctl --user show {unit}: {said(result)}")
        return parse_show(result.stdout)

    def _systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self._run(*args)
        if result.returncode != 0:
            raise SystemctlError(f"systemctl --user {' '.join(args)}: {said(result)}")
        return result

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            raise RuntimeNotFoundError("systemctl not found: set the Gateway's serviceManager to process")
        return subprocess.run([systemctl, "--user", *args], capture_output=True, text=True, timeout=60)


def _exit_code(facts: dict[str, str]) -> int | None:
    """The main process's last exit: its code, or minus the signal that killed it. systemd forgets the exit of an
    inactive unit it unloads, but keeps ``Result``: a ``success`` then still says the exit was clean."""
    status = facts.get("ExecMainStatus", "")
    if status.lstrip("-").isdigit() and facts.get("ExecMainCode", "0") != "0":
        return int(status) if facts.get("ExecMainCode") == _CLD_EXITED else -int(status)
    if facts.get("ActiveState") == "inactive" and facts.get("Result") == "success":
        return 0
    return None
