#!/usr/bin/env python3
"""A test double for launchctl and launchd, for Linux where launchd cannot run. It is a double, named as one.

It keeps to what athanor relies on, and behaves as launchctl does there:

- the same syntax, exit codes and messages: ``bootstrap DOMAIN PLIST`` (5 when the label is loaded or disabled
  or the plist is unreadable), ``bootout DOMAIN/LABEL`` (3 when not loaded), ``kickstart [-k]``, ``print`` (113
  for an unknown service; ``state``, ``pid``, ``runs``, ``last exit code`` or ``last terminating signal``;
  ``print DOMAIN`` lists its services, and ``gui/UID`` exists only in a login session), ``enable``, ``disable``,
  ``print-disabled``, ``managername``;
- ``bootout`` returns at once and the job goes away a moment later, once its process has exited (SIGTERM, then
  SIGKILL after ``ExitTimeOut``);
- real processes from ``ProgramArguments``, with ``EnvironmentVariables``, ``WorkingDirectory`` and the
  ``StandardOutPath``/``StandardErrorPath`` logs, each in a session of its own;
- ``RunAtLoad``, and ``KeepAlive`` (true, or ``{SuccessfulExit: false}``) restarts spaced by ``ThrottleInterval``.

``launchctl_double.py STATE_DIR ARGS...`` is launchctl (tests put a wrapper named ``launchctl`` on PATH). The
first call starts ``launchctl_double.py STATE_DIR --launchd``, the daemon that holds the jobs, and the calls talk
to it over ``STATE_DIR/launchd.sock``. ``--shutdown`` kills every job and the daemon (the tests' clean-up).
"""

from __future__ import annotations

import json
import os
import plistlib
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

SIGNAL_NAMES = {signal.SIGKILL: "Killed", signal.SIGTERM: "Terminated", signal.SIGINT: "Interrupt",
                signal.SIGABRT: "Abort trap", signal.SIGSEGV: "Segmentation fault"}


class Job:
    def __init__(self, domain: str, path: str, plist: dict):
        self.domain, self.path, self.plist = domain, path, plist
        self.label = plist["Label"]
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.last_status: int | None = None  # Popen returncode: negative for a signal
        self.last_spawn = 0.0
        self.booting_out = False
        self.restart_after_exit = False  # kickstart -k
        self.restart_timer: threading.Timer | None = None
        self.kill_timer: threading.Timer | None = None  # SIGKILL at ExitTimeOut after a bootout's SIGTERM

    def keep_alive(self, status: int) -> bool:
        keep = self.plist.get("KeepAlive", False)
        if isinstance(keep, dict):
            return "SuccessfulExit" in keep and (status == 0) == keep["SuccessfulExit"]
        return bool(keep)

    def runs_at_load(self) -> bool:
        keep = self.plist.get("KeepAlive", False)
        implied = isinstance(keep, dict) and "SuccessfulExit" in keep
        return bool(self.plist.get("RunAtLoad")) or keep is True or implied


class Launchd:
    def __init__(self, state: Path):
        self.state = state
        self.jobs: dict[str, Job] = {}
        self.lock = threading.RLock()
        self.disabled_file = state / "disabled.json"
        self.disabled: set[str] = set(json.loads(self.disabled_file.read_text())) if self.disabled_file.exists() else set()

    # the commands
    def handle(self, argv: list[str]) -> tuple[int, str, str]:
        if not argv:
            return 64, "", "Usage: launchctl <subcommand> ... | help [subcommand]\n"
        command, args = argv[0], argv[1:]
        with self.lock:
            if command == "managername":
                return 0, os.environ.get("LAUNCHCTL_DOUBLE_SESSION", "Aqua") + "\n", ""
            if command == "bootstrap" and len(args) == 2:
                return self.bootstrap(*args)
            if command == "print" and args and args[-1].count("/") == 1:
                return self.print_domain(args[-1])
            if command in ("bootout", "print", "kickstart", "enable", "disable") and args:
                target = args[-1]
                domain, _, label = target.rpartition("/")
                if command in ("enable", "disable"):
                    self.disabled.discard(target) if command == "enable" else self.disabled.add(target)
                    self.disabled_file.write_text(json.dumps(sorted(self.disabled)))
                    return 0, "", ""
                job = self.jobs.get(label)
                if job is None or job.domain != domain:
                    if command == "bootout":
                        return 3, "", "Boot-out failed: 3: No such process\n"
                    return 113, "", f'Could not find service "{label}" in domain for port\n'
                if command == "bootout":
                    return self.bootout(job)
                if command == "print":
                    return 0, self.describe(job), ""
                return self.kickstart(job, "-k" in args)
            if command == "print-disabled" and args:
                lines = [f'\t"{t.rpartition("/")[2]}" => disabled' for t in sorted(self.disabled)
                         if t.startswith(args[0] + "/")]
                return 0, "disabled services = {\n" + "".join(line + "\n" for line in lines) + "}\n", ""
        return 64, "", f"Unrecognized subcommand: {command}\nUsage: launchctl <subcommand> ... | help [subcommand]\n"

    def print_domain(self, domain: str) -> tuple[int, str, str]:
        """A login session's gui domain exists only with one (LAUNCHCTL_DOUBLE_SESSION=Background: none)."""
        if domain.startswith("gui/") and os.environ.get("LAUNCHCTL_DOUBLE_SESSION", "Aqua") != "Aqua":
            return 113, "", f"Could not find domain for {domain}\n"
        rows = [f"\t{job.proc.pid if job.proc and job.proc.poll() is None else '-'}\t"
                f"{job.last_status or 0}\t{job.label}" for job in self.jobs.values() if job.domain == domain]
        return 0, f"{domain} = {{\n\tservices = {{\n" + "".join(r + "\n" for r in rows) + "\t}\n}\n", ""

    def bootstrap(self, domain: str, path: str) -> tuple[int, str, str]:
        failed = (5, "", "Bootstrap failed: 5: Input/output error\n")
        try:
            with open(path, "rb") as fh:
                plist = plistlib.load(fh)
        except (OSError, plistlib.InvalidFileException, ValueError):
            return failed
        label = plist.get("Label")
        if not isinstance(label, str) or label in self.jobs or f"{domain}/{label}" in self.disabled:
            return failed
        job = self.jobs[label] = Job(domain, path, plist)
        if job.runs_at_load():
            self.spawn(job)
        return 0, "", ""

    def bootout(self, job: Job) -> tuple[int, str, str]:
        job.booting_out = True
        if job.restart_timer:
            job.restart_timer.cancel()
        if job.proc is None or job.proc.poll() is not None:
            del self.jobs[job.label]
            return 0, "", ""
        _signal_group(job.proc.pid, signal.SIGTERM)
        job.kill_timer = threading.Timer(job.plist.get("ExitTimeOut", 20), _signal_group,
                                         (job.proc.pid, signal.SIGKILL))
        job.kill_timer.start()
        return 0, "", ""  # the job leaves when its process has exited: a moment after this returns

    def kickstart(self, job: Job, kill: bool) -> tuple[int, str, str]:
        running = job.proc is not None and job.proc.poll() is None
        if running and kill:
            job.restart_after_exit = True
            _signal_group(job.proc.pid, signal.SIGKILL)
        elif not running:
            self.spawn(job)
        return 0, "", ""

    def describe(self, job: Job) -> str:
        running = job.proc is not None and job.proc.poll() is None
        lines = [f"{job.domain}/{job.label} = {{", "\tactive count = 1", f"\tpath = {job.path}",
                 f"\tstate = {'running' if running else 'not running'}", "",
                 f"\tprogram = {job.plist['ProgramArguments'][0]}", f"\truns = {job.runs}"]
        if running:
            lines.append(f"\tpid = {job.proc.pid}")
        if job.last_status is None:
            lines.append("\tlast exit code = (never exited)")
        elif job.last_status < 0:
            number = -job.last_status
            lines.append(f"\tlast terminating signal = {SIGNAL_NAMES.get(number, 'Signal')}: {number}")
        else:
            lines.append(f"\tlast exit code = {job.last_status}")
        return "\n".join(lines + ["}"]) + "\n"

    # the jobs
    def spawn(self, job: Job) -> None:
        plist = job.plist
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.environ.get("HOME", "/"),
               **plist.get("EnvironmentVariables", {})}
        try:
            out = open(plist.get("StandardOutPath", os.devnull), "ab")
            err = out if plist.get("StandardErrorPath") == plist.get("StandardOutPath") else \
                open(plist.get("StandardErrorPath", os.devnull), "ab")
        except OSError:
            job.last_status = 78  # EX_CONFIG, as launchd reports a job it cannot set up
            return
        try:
            job.proc = subprocess.Popen(plist["ProgramArguments"], env=env, cwd=plist.get("WorkingDirectory", "/"),
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        except OSError as exc:
            job.last_status = 78
            out.write(f"launchd double: cannot spawn: {exc}\n".encode())
            return
        finally:
            out.close()
            if err is not out:
                err.close()
        job.runs += 1
        job.last_spawn = time.monotonic()
        threading.Thread(target=self.watch, args=(job, job.proc), daemon=True).start()

    def watch(self, job: Job, proc: subprocess.Popen) -> None:
        status = proc.wait()
        with self.lock:
            job.last_status = status
            if job.kill_timer is not None:
                job.kill_timer.cancel()  # the pid may be reused once reaped: never signal it again
            if job.booting_out:
                self.jobs.pop(job.label, None)
                return
            if job.restart_after_exit:
                job.restart_after_exit = False
                self.spawn(job)
            elif job.keep_alive(status):
                wait = max(0.0, job.last_spawn + job.plist.get("ThrottleInterval", 10) - time.monotonic())
                job.restart_timer = threading.Timer(wait, self.restart, (job,))
                job.restart_timer.start()

    def restart(self, job: Job) -> None:
        with self.lock:
            if not job.booting_out and self.jobs.get(job.label) is job:
                self.spawn(job)

    def shutdown(self) -> None:
        with self.lock:
            for job in self.jobs.values():
                job.booting_out = True
                if job.restart_timer:
                    job.restart_timer.cancel()
                if job.proc is not None and job.proc.poll() is None:
                    _signal_group(job.proc.pid, signal.SIGKILL)
        for job in list(self.jobs.values()):
            if job.proc is not None:
                job.proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve(state: Path) -> None:
    launchd = Launchd(state)
    sock_path = state / "launchd.sock"
    sock_path.unlink(missing_ok=True)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            argv = json.loads(self.rfile.readline())
            if argv == ["--shutdown"]:
                launchd.shutdown()
                self.wfile.write(json.dumps([0, "", ""]).encode() + b"\n")
                threading.Thread(target=server.shutdown).start()
                return
            self.wfile.write(json.dumps(launchd.handle(argv)).encode() + b"\n")

    server = socketserver.ThreadingUnixStreamServer(str(sock_path), Handler)
    (state / "launchd.pid").write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: (launchd.shutdown(), os._exit(0)))
    server.serve_forever()
    sock_path.unlink(missing_ok=True)


def call(state: Path, argv: list[str]) -> int:
    sock_path = state / "launchd.sock"
    for attempt in range(200):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(sock_path))
                sock.sendall(json.dumps(argv).encode() + b"\n")
                code, out, err = json.loads(sock.makefile().readline())
            sys.stdout.write(out)
            sys.stderr.write(err)
            return code
        except (FileNotFoundError, ConnectionRefusedError):
            if argv == ["--shutdown"]:
                return 0
            if attempt == 0:  # the first call starts launchd
                subprocess.Popen([sys.executable, __file__, str(state), "--launchd"], start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=open(state / "launchd.log", "ab"))
            time.sleep(0.02)  # waiting for the double's launchd to listen
    sys.stderr.write("launchctl double: launchd did not start\n")
    return 1


if __name__ == "__main__":
    state_dir = Path(sys.argv[1])
    state_dir.mkdir(parents=True, exist_ok=True)
    if sys.argv[2:] == ["--launchd"]:
        serve(state_dir)
    else:
        sys.exit(call(state_dir, sys.argv[2:]))
