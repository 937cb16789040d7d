"""The embedded supervisor: model runtimes as detached processes that outlive the daemon.

A runtime must survive a daemon restart, so it runs in its own session (``start_new_session``), writes to a log
file rather than a pipe, and is found again from a ``ProcessHandle`` the caller keeps in state.json. A PID alone
is not an identity (the kernel reuses them), so a handle also carries the process create time, and nothing here
signals a PID whose create time does not match.

Stopping follows llama-swap: SIGTERM the process group, wait, SIGKILL the group, always reap. The tree is
collected before the first signal because a descendant that left the group (``setsid``) is reachable only through
its parent, which is about to die.

Reaping happens in one place, ``_reap``, under one lock: the exit status of a child is collected exactly once and
kept, whichever thread asks first (``Popen.poll`` quietly answers None to a second caller while another one
holds its internal lock, which once left zombies and unknown exit codes behind). The daemon's monitor calls
``reap`` every round, so a child that died unobserved never stays a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from athanor.errors import InvalidValueError, RuntimeNotFoundError
from athanor.managers import logs
from athanor.managers.base import Handle, Job, JobState, LocalManager, same_start
from athanor.paths import ensure_private_dir, open_private_file
from athanor.runtimes.features import takes_unix_socket
from athanor.runtimes.launch import RUNTIMES, LaunchSpec, socket_path
from athanor.timestamps import UTC_FORMAT, utc_timestamp

DEFAULT_LOG_MAX_BYTES = logs.DEFAULT_MAX_BYTES
KILL_WAIT_S = 5.0
_HANDLE_FIELDS = ("name", "pid", "create_time", "log_path", "started_at")


@dataclass(frozen=True)
class ProcessHandle:
    """Everything needed to find a runtime again after the daemon that started it is gone."""

    name: str
    pid: int
    create_time: float
    log_path: str
    started_at: str

    def __post_init__(self) -> None:
        # A handle can come from a hand-edited state.json, and a bad pid is dangerous (killpg(0) is our own group).
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"invalid process handle: {field} must be {expected}, got {getattr(self, field)!r}")

        if not isinstance(self.name, str) or not self.name:
            raise bad("name", "a non-empty string")
        if not isinstance(self.pid, int) or isinstance(self.pid, bool) or self.pid <= 0:
            raise bad("pid", "a positive integer")
        ct = self.create_time
        if not isinstance(ct, (int, float)) or isinstance(ct, bool) or not math.isfinite(ct) or ct < 0:
            raise bad("create_time", "a non-negative number")
        if not isinstance(self.log_path, str) or not self.log_path:
            raise bad("log_path", "a non-empty string")
        try:
            datetime.strptime(self.started_at, UTC_FORMAT)
        except (TypeError, ValueError):
            raise bad("started_at", "an ISO-8601 UTC time like 2026-11-25T05:00:00Z") from None

    def to_json(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in _HANDLE_FIELDS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessHandle:
        """Unknown keys are ignored so a newer athanor's state.json still reads."""
        if not isinstance(data, Mapping):
            raise ValueError(f"invalid process handle: expected an object, got {type(data).__name__}")
        missing = [field for field in _HANDLE_FIELDS if field not in data]
        if missing:
            raise ValueError(f"invalid process handle: missing {', '.join(missing)}")
        return cls(**{field: data[field] for field in _HANDLE_FIELDS})


class ProcessSupervisor:
    """Starts, watches and stops runtimes; keeps no state of its own beyond the children it started itself."""

    def __init__(self, logs_dir: Path, *, log_max_bytes: int = DEFAULT_LOG_MAX_BYTES):
        self.logs_dir = Path(logs_dir)
        self.log_max_bytes = log_max_bytes
        # Only our own children can be reaped and give an exit code; handles from an earlier daemon have no entry.
        # The Popen objects stay referenced until forgotten: one dropped while its child runs would be reaped by
        # the subprocess module's own collector, a second reaper.
        self._children: dict[int, tuple[ProcessHandle, subprocess.Popen[bytes]]] = {}
        self._reap_lock = threading.Lock()

    def start(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> ProcessHandle:
        """Start ``argv`` detached, its output appended to ``logs/<name>.log``.

        O_APPEND lets copytruncate rotation shrink the file under the runtime without leaving a hole.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        argv = [os.fspath(arg) for arg in argv]
        log_path = self._log_path(name)
        ensure_private_dir(log_path.parent)
        self._rotate(log_path)
        started_at = utc_timestamp()
        # 0600: the command line may carry an API key.
        fd = open_private_file(log_path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"=== {started_at} starting: {shlex.join(argv)}\n".encode())
            forked_at = _fork_time()
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    start_new_session=True,
                    env={**os.environ, **(env or {})},
                    cwd=cwd,
                )
            except OSError as exc:
                reason = f"{exc.filename or argv[0]}: {exc.strerror or exc}"
                os.write(fd, f"=== {utc_timestamp()} failed: {reason}\n".encode())
                raise RuntimeNotFoundError(f"cannot start {name}: {reason}") from exc
        finally:
            os.close(fd)
        create_time = forked_at if forked_at is not None else _create_time(popen.pid)
        handle = ProcessHandle(name, popen.pid, create_time, str(log_path), started_at)
        self._children[popen.pid] = (handle, popen)
        return handle

    def alive(self, handle: ProcessHandle) -> bool:
        """A zombie counts as dead: it holds a PID but serves nothing. Our own child is asked with waitpid alone,
        never through /proc: a start asks this while its runtime loads, on the event loop (``_fork_time``)."""
        popen = self._popen(handle)
        if popen is not None:
            return self._reap(popen) is None
        proc = self._process(handle)
        return proc is not None and _running(proc)

    def exit_code(self, handle: ProcessHandle) -> int | None:
        """Negative means killed by that signal; None while running or when the process is not our child."""
        popen = self._popen(handle)
        return self._reap(popen) if popen is not None else None

    def wait_exit(self, handle: ProcessHandle, timeout: float) -> bool:
        """Whether the process is gone within ``timeout`` seconds. A runtime killed by a signal closes its
        sockets before the kernel marks it dead, so a broken connection can come a moment before the death."""
        proc = self._process(handle)
        return proc is None or not _wait_gone([proc], timeout)

    def reap(self) -> list[ProcessHandle]:
        """Collect every child of ours that has exited (so none stays a zombie); returns their handles."""
        return [handle for handle, popen in list(self._children.values()) if self._reap(popen) is not None]

    def forget(self, handle: ProcessHandle) -> None:
        """Drop a child that has exited and whose exit the caller has recorded."""
        popen = self._popen(handle)
        if popen is not None and self._reap(popen) is not None:
            del self._children[handle.pid]

    def _reap(self, popen: subprocess.Popen[bytes]) -> int | None:
        """The child's exit code, collected at most once (then kept by Popen); None while it runs."""
        with self._reap_lock:
            return popen.poll()

    def stop(self, handle: ProcessHandle, timeout: float = 10.0) -> int | None:
        """SIGTERM, up to ``timeout`` seconds of grace, then SIGKILL; safe on a dead process and when repeated.

        A leader that is already gone may have left members of its group running (a wrapper script that did not
        ``exec``): they are stopped the same way.
        """
        leader = self._process(handle)
        if leader is None:
            tree = self._left_behind(handle)
            if not tree:
                return self._reaped(handle)
        else:
            tree = [leader]
            with contextlib.suppress(psutil.Error):
                tree += _descendants(leader)
            self._signal_group(handle, signal.SIGTERM)
        for proc in tree[1:] if leader else tree:
            if leader is None or _left_group(proc, handle.pid):
                _signal(proc, signal.SIGTERM)
        survivors = _wait_gone(tree, timeout)
        # Also unconditionally: it reaches group members whose parent died before we could collect them.
        self._signal_group(handle, signal.SIGKILL)
        for proc in survivors:
            _signal(proc, signal.SIGKILL)
        _wait_gone(survivors, KILL_WAIT_S)
        return self._reaped(handle)

    @staticmethod
    def _left_behind(handle: ProcessHandle) -> list[psutil.Process]:
        """Members of the group of a leader that is gone. A group id is not reused while the group has members,
        so they are the runtime's; unless the leader's pid names a new process, which may lead a group of its own
        under that id: then nothing is taken for ours."""
        if psutil.pid_exists(handle.pid):
            return []
        members = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == handle.pid:
                    members.append(proc)
            except (ProcessLookupError, PermissionError):
                continue
        return members

    def _reaped(self, handle: ProcessHandle) -> int | None:
        """The exit code of a child of ours that is dead or dying, once the kernel hands it over (a process killed
        a moment ago may not be collectable yet). None for a process that is not our child."""
        popen = self._popen(handle)
        if popen is None:
            return None
        deadline = time.monotonic() + KILL_WAIT_S
        delay = 0.001
        while (code := self._reap(popen)) is None and time.monotonic() < deadline:
            time.sleep(delay)  # polling for a dying child's exit status, bounded
            delay = min(delay * 2, 0.05)
        return code

    def rotate_logs(self, handle: ProcessHandle) -> bool:
        return self._rotate(Path(handle.log_path))

    def log_tail(self, name: str, lines: int = 50) -> list[str]:
        return logs.tail(self._log_path(name), lines)

    def _rotate(self, path: Path) -> bool:
        return logs.rotate(path, self.log_max_bytes)

    def _log_path(self, name: str) -> Path:
        if not name or "/" in name or "\0" in name or name in {".", ".."}:
            raise InvalidValueError(f"not a usable process name: {name!r}")
        return self.logs_dir / f"{name}.log"

    def _popen(self, handle: ProcessHandle) -> subprocess.Popen[bytes] | None:
        entry = self._children.get(handle.pid)
        if entry is None or not same_start(entry[0].create_time, handle.create_time):
            return None
        return entry[1]

    def _process(self, handle: ProcessHandle) -> psutil.Process | None:
        """The process behind ``handle`` if the PID still names it (alive or an unreaped zombie)."""
        try:
            proc = psutil.Process(handle.pid)
            return proc if same_start(handle.create_time, proc.create_time()) else None
        except psutil.Error:
            return None

    def _signal_group(self, handle: ProcessHandle, sig: int) -> None:
        """The group id is the leader's PID, which is ours only while the leader (or its zombie) still holds it."""
        if self._process(handle) is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, sig)


def _fork_time() -> float | None:
    """The create time psutil will report for a process forked now, or None where it cannot be worked out.

    psutil reads it from /proc/PID/stat, and reading that file while the child's dynamic loader maps its libraries
    waits for them: 1.5-3.5 ms (up to 5) just after llama-server was spawned, on a swap's path. On Linux it counts
    in the boot clock (the kernel's ``start_boottime``) from the boot time psutil adds to it, so the same figure is
    had from the clock just before the fork, within a clock tick: far inside ``CREATE_TIME_TOLERANCE_S``."""
    if not sys.platform.startswith("linux"):
        return None
    return psutil.boot_time() + time.clock_gettime(time.CLOCK_BOOTTIME)


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0  # already dead and unreadable: the handle can then never match a live process


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _left_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) != pgid
    except ProcessLookupError:
        return False


def _signal(proc: psutil.Process, sig: int) -> None:
    """psutil refuses to signal a PID that was reused since ``proc`` was looked up."""
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        proc.send_signal(sig)


def _descendants(leader: psutil.Process) -> list[psutil.Process]:
    """Every process below ``leader``. Linux names each task's children in /proc: a few small reads. Elsewhere
    psutil looks at every process on the machine (a millisecond here, more on a busy Mac), which a swap's stop
    paid while the next runtime loaded."""
    children = _proc_children(leader.pid)
    if children is None:
        return leader.children(recursive=True)
    found: list[psutil.Process] = []
    while children:
        pid = children.pop()
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue  # gone meanwhile: so are its children, or they were re-parented away
        children.extend(_proc_children(pid) or [])
    return found


def _proc_children(pid: int) -> list[int] | None:
    """The children of ``pid`` from /proc/PID/task/*/children; None where the kernel does not say (no /proc, or
    built without it), [] for a process that is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return [] if os.path.isdir("/proc/self/task") else None
    except OSError:
        return None
    pids: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread ended meanwhile
            return None  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return pids


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process is dead; return those still running at the deadline.

    Not psutil.wait_procs: it waits until an orphan's zombie is reaped, which never happens under a PID 1 that does
    not reap (a bare container), so every stop would last the full timeout. Dead but unreaped is gone enough.

    A runtime exits a few milliseconds after SIGTERM, and a swap waits for it: where the kernel tells of an exit
    (Linux's pidfd), the wait ends when it happens; elsewhere the processes are looked at again after a delay that
    grows with the time waited (``_poll_delay``), never a fixed floor.
    """
    started = time.monotonic()
    deadline = started + timeout
    exits = _exit_fds(procs)
    try:
        while True:
            alive = [proc for proc in procs if _running(proc)]
            now = time.monotonic()
            remaining = deadline - now
            if not alive or remaining <= 0:
                return alive
            if all(proc.pid in exits for proc in alive):
                poller = select.poll()
                for proc in alive:
                    poller.register(exits[proc.pid], select.POLLIN)
                poller.poll(math.ceil(remaining * 1000))  # readable once a process has exited
            else:
                time.sleep(min(_poll_delay(now - started), remaining))  # no exit notice here: look again
    finally:
        for fd in exits.values():
            os.close(fd)


def _exit_fds(procs: list[psutil.Process]) -> dict[int, int]:
    """{pid: a pidfd} for the processes the kernel can notify the exit of (Linux 5.3+; none elsewhere). A pid that
    names a new process by the time its pidfd opens is harmless: ``_running`` checks the process's start time first,
    so that pidfd is never waited on."""
    if not hasattr(os, "pidfd_open"):
        return {}
    fds = {}
    for proc in procs:
        with contextlib.suppress(OSError):  # gone already, or a kernel without pidfd
            fds[proc.pid] = os.pidfd_open(proc.pid)
    return fds


def _poll_delay(waited: float) -> float:
    """Seconds between looks at processes whose exit the kernel does not announce: 1 ms at first, then 5% of the
    time waited so far, at most 100 ms."""
    return min(max(0.001, waited * 0.05), 0.1)


class ProcessManager(LocalManager):
    """The embedded supervisor behind the ``ServiceManager`` protocol: no files, runtimes as detached children.

    A job's environment is added to the daemon's own, as it always was: the runtime inherits PATH, HF_* and the
    rest from the gateway that starts it.

    A runtime that can listen on a Unix socket does, in ``sockets_dir`` (``LaunchSpec.socket``). Only this manager
    offers one: it spawns every start itself, so it can first remove the socket file a killed runtime left, which
    llama-server will not bind over. launchd and systemd restart a crashed runtime on their own, past any such care.
    """

    name = "process"

    def __init__(self, logs_dir: Path, sockets_dir: Path | None = None):
        self.supervisor = ProcessSupervisor(logs_dir)
        self.sockets_dir = sockets_dir

    def prepared(self, launch: LaunchSpec) -> LaunchSpec:
        if (self.sockets_dir is None or not RUNTIMES[launch.runtime].unix_socket
                or not takes_unix_socket(launch.argv[0])):  # an older llama-server would not start
            return launch
        socket = socket_path(self.sockets_dir, launch.port)
        return replace(launch, socket=socket) if socket else launch

    def files(self, job: Job) -> dict[Path, bytes]:
        return {}

    async def start(self, job: Job) -> Handle:
        def start() -> ProcessHandle:
            if job.socket:
                _remove_socket(job.socket)
            return self.supervisor.start(job.name, list(job.argv), job.environment(), Path(job.workdir))

        handle = await asyncio.to_thread(start)
        return {"manager": self.name, **handle.to_json()}

    async def stop(self, handle: Handle, grace: float) -> int | None:
        return await asyncio.to_thread(self.supervisor.stop, _process_handle(handle), grace)

    async def observe(self, handle: Handle) -> JobState:
        """Two reads of /proc (or a waitpid of our own child): cheap enough for the event loop."""
        process = _process_handle(handle)
        running = self.supervisor.alive(process)
        return JobState(running, process.pid, None if running else self.supervisor.exit_code(process))

    async def wait_exit(self, handle: Handle, timeout: float) -> bool:
        return await asyncio.to_thread(self.supervisor.wait_exit, _process_handle(handle), timeout)

    async def housekeeping(self, handles: list[Handle]) -> None:
        self.supervisor.reap()
        processes = [_process_handle(h) for h in handles]
        await asyncio.to_thread(lambda: [self.supervisor.rotate_logs(p) for p in processes])

    def forget(self, handle: Handle) -> None:
        self.supervisor.forget(_process_handle(handle))


def _remove_socket(path: str) -> None:
    """Remove the socket a runtime that was killed left at ``path``; anything but a socket stays where it is."""
    ensure_private_dir(Path(path).parent)  # whoever may connect may talk to the runtime
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _process_handle(handle: Handle) -> ProcessHandle:
    return ProcessHandle.from_json(handle)
