"""The embedded supervisor against real processes and real signals.

Children are small Python programs carrying MARKER (and a per-test token) on their command line, so a stray one
can be found with ``pgrep -f`` and every test can sweep its own leftovers. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from athanor.errors import InvalidValueError, RuntimeNotFoundError
from athanor.managers.process import ProcessHandle, ProcessSupervisor

MARKER = "athanor-supervisor-test-child"
PR_SET_CHILD_SUBREAPER = 36

WAIT_UNTIL_KILLED = """
    import signal, sys
    print("ready", flush=True)
    while True:
        signal.pause()
"""


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def gone(pid: int, create_time: float) -> bool:
    """Dead and reaped. Orphans are reparented to us (the subreaper) or to launchd, so reaping is ours to do here.

    Call only for processes the supervisor does not own as Popen children, or their exit status would be stolen.
    """
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return abs(psutil.Process(pid).create_time() - create_time) > 0.01
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> Iterator[None]:
    """Orphans go to PID 1, which in a bare container never reaps them; as subreaper we get them and can reap."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


class Lab:
    """Starts children through a supervisor and makes sure none of them outlives the test."""

    def __init__(self, tmp_path: Path, **supervisor_options: int):
        self.tmp = tmp_path
        self.logs = tmp_path / "logs"
        self.sup = ProcessSupervisor(self.logs, **supervisor_options)
        self.token = f"{MARKER}-{uuid.uuid4().hex}"
        self.handles: list[ProcessHandle] = []
        self.pids: dict[int, float] = {}

    def argv(self, name: str, code: str) -> list[str]:
        script = self.tmp / f"{name}.py"
        script.write_text(textwrap.dedent(code))
        return [sys.executable, "-u", str(script), self.token]

    def start(self, name: str, code: str, **kwargs: object) -> ProcessHandle:
        return self.track(self.sup.start(name, self.argv(name, code), **kwargs))

    def track(self, handle: ProcessHandle) -> ProcessHandle:
        self.handles.append(handle)
        self.pids[handle.pid] = handle.create_time
        return handle

    def watch(self, pid: int) -> float:
        self.pids[pid] = create_time = psutil.Process(pid).create_time()
        return create_time

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def wait_log(self, name: str, text: str) -> None:
        wait_for(lambda: text in self.log(name), what=f"{text!r} in {name}.log")

    def cleanup(self) -> None:
        for handle in self.handles:
            with contextlib.suppress(Exception):
                self.sup.stop(handle, timeout=1.0)
        # Last resort, for a failed stop or a child the test never learned about: kill by pid.
        victims = [p for p in psutil.process_iter(["cmdline"]) if self.token in (p.info["cmdline"] or [])]
        for pid, create_time in self.pids.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if abs(proc.create_time() - create_time) <= 0.01:
                    victims.append(proc)
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(victims, timeout=5)
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.cleanup()


@pytest.fixture
def small_log_lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path, log_max_bytes=1000)
    yield lab
    lab.cleanup()


def test_start_runs_detached_in_own_group_and_logs(lab: Lab, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    argv = lab.argv(
        "echo",
        """
        import os, signal, sys
        print("hello from child", os.environ["ATHANOR_TEST_VAR"], os.getcwd(), repr(sys.stdin.read()), flush=True)
        while True:
            signal.pause()
        """,
    )
    handle = lab.track(lab.sup.start("echo", argv, env={"ATHANOR_TEST_VAR": "42"}, cwd=workdir))

    assert lab.sup.alive(handle)
    assert lab.sup.exit_code(handle) is None
    assert os.getsid(handle.pid) == handle.pid
    assert os.getpgid(handle.pid) == handle.pid
    # Taken from the clock at the fork (no /proc read while the child loads), psutil's counts whole clock ticks.
    assert handle.create_time == pytest.approx(psutil.Process(handle.pid).create_time(), abs=0.02)
    assert handle.log_path == str(lab.logs / "echo.log")
    lab.wait_log("echo", "hello from child")
    header, output = lab.log("echo").splitlines()[:2]
    assert header == f"=== {handle.started_at} starting: {shlex.join(argv)}"
    assert output == f"hello from child 42 {workdir} ''"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (WAIT_UNTIL_KILLED, -signal.SIGTERM),
        (
            """
            import signal, sys
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            print("ready", flush=True)
            while True:
                signal.pause()
            """,
            0,
        ),
    ],
    ids=["default-sigterm", "handles-sigterm"],
)
def test_stop_ends_a_well_behaved_child_with_sigterm(lab: Lab, code: str, expected: int) -> None:
    handle = lab.start("polite", code)
    lab.wait_log("polite", "ready")

    assert lab.sup.stop(handle, timeout=10) == expected
    assert not lab.sup.alive(handle)
    assert lab.sup.exit_code(handle) == expected
    assert not psutil.pid_exists(handle.pid)  # reaped, not a zombie
    assert lab.sup.stop(handle) == expected  # a second stop is harmless


def test_stop_sigkills_a_child_that_ignores_sigterm(lab: Lab) -> None:
    handle = lab.start(
        "stubborn",
        """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while True:
            signal.pause()
        """,
    )
    lab.wait_log("stubborn", "ready")

    began = time.monotonic()
    assert lab.sup.stop(handle, timeout=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - began < 5
    assert not psutil.pid_exists(handle.pid)


@pytest.mark.parametrize(
    ("escapes", "on_term"),
    [(False, "default"), (True, "graceful"), (True, "ignore")],
    ids=["grandchild-in-group", "grandchild-setsid", "grandchild-setsid-ignores-term"],
)
def test_stop_leaves_no_orphans(lab: Lab, escapes: bool, on_term: str) -> None:
    grandchild = f"""
import os, signal, sys
if {escapes}:
    os.setsid()
if {on_term!r} == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if {on_term!r} == "graceful":
    signal.signal(signal.SIGTERM, lambda *_: (print("grandchild got SIGTERM", flush=True), sys.exit(0)))
print("grandchild ready", flush=True)
while True:
    signal.pause()
"""
    handle = lab.start(
        "parent",
        f"""
        import signal, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {grandchild!r}, sys.argv[1]])
        print("grandchild-pid", child.pid, flush=True)
        while True:
            signal.pause()
        """,
    )
    lab.wait_log("parent", "grandchild ready")
    lab.wait_log("parent", "grandchild-pid")
    pid_line = next(ln for ln in lab.log("parent").splitlines() if ln.startswith("grandchild-pid "))
    grandchild_pid = int(pid_line.split()[1])
    grandchild_ct = lab.watch(grandchild_pid)
    assert (os.getpgid(grandchild_pid) == handle.pid) is not escapes

    lab.sup.stop(handle, timeout=0.5 if on_term == "ignore" else 10)

    assert not psutil.pid_exists(handle.pid)
    wait_for(lambda: gone(grandchild_pid, grandchild_ct), what="the grandchild to be gone")
    # Outside the group it is reached only by name: it still gets the graceful signal first.
    assert ("grandchild got SIGTERM" in lab.log("parent")) is (on_term == "graceful")


def test_reattach_after_daemon_restart(lab: Lab) -> None:
    daemon = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from athanor.managers.process import ProcessSupervisor
        handle = ProcessSupervisor(Path(sys.argv[1])).start("runtime", sys.argv[2:])
        print(json.dumps(handle.to_json()))
        """
    )
    argv = lab.argv("runtime", WAIT_UNTIL_KILLED)
    first = subprocess.Popen([sys.executable, "-c", daemon, str(lab.logs), *argv], stdout=subprocess.PIPE, text=True)
    # The runtime must not hold the daemon's stdout, or this would wait for the runtime to exit.
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 0
    handle = lab.track(ProcessHandle.from_json(json.loads(out)))
    assert psutil.Process(handle.pid).ppid() != first.pid  # outlived the daemon that started it

    restarted = ProcessSupervisor(lab.logs)
    assert restarted.alive(handle)
    assert restarted.exit_code(handle) is None  # not our child: no exit status to read
    assert restarted.stop(handle, timeout=10) is None
    assert not restarted.alive(handle)
    wait_for(lambda: gone(handle.pid, handle.create_time), what="the re-attached runtime to be gone")


def test_reused_pid_is_never_taken_for_ours(lab: Lab) -> None:
    handle = lab.start("real", WAIT_UNTIL_KILLED)
    lab.wait_log("real", "ready")
    stale = dataclasses.replace(handle, create_time=handle.create_time - 1000)

    assert not lab.sup.alive(stale)
    assert lab.sup.exit_code(stale) is None
    assert lab.sup.stop(stale, timeout=0.5) is None
    assert lab.sup.alive(handle)
    assert psutil.Process(handle.pid).status() != psutil.STATUS_ZOMBIE
    assert lab.sup.stop(handle) == -signal.SIGTERM


def test_externally_killed_child_is_dead_with_its_signal(lab: Lab) -> None:
    handle = lab.start("victim", WAIT_UNTIL_KILLED)
    os.kill(handle.pid, signal.SIGKILL)

    wait_for(lambda: not lab.sup.alive(handle), what="the killed child to be seen dead")
    assert lab.sup.exit_code(handle) == -signal.SIGKILL
    assert not psutil.pid_exists(handle.pid)  # alive() reaped it
    assert lab.sup.stop(handle) == -signal.SIGKILL


@pytest.mark.parametrize("executable", [False, True], ids=["missing", "not-executable"])
def test_unstartable_runtime_is_named_in_the_error(lab: Lab, tmp_path: Path, executable: bool) -> None:
    binary = tmp_path / "llama-server"
    if executable:
        binary.write_text("not a program\n")
        binary.chmod(0o644)

    with pytest.raises(RuntimeNotFoundError, match=str(binary)):
        lab.sup.start("ghost", [str(binary), "--port", "1"])
    assert "failed" in lab.sup.log_tail("ghost", 1)[0]


def test_names_that_escape_the_logs_dir_are_refused(lab: Lab) -> None:
    for name in ["", "..", "a/b"]:
        with pytest.raises(InvalidValueError):
            lab.sup.start(name, [sys.executable, "-c", "pass"])


def test_rotate_logs_copies_the_tail_and_truncates_in_place(small_log_lab: Lab) -> None:
    lab = small_log_lab
    handle = lab.start(
        "chatty",
        """
        import signal
        signal.signal(signal.SIGUSR1, lambda *_: print("after rotate", flush=True))
        for i in range(100):
            print(f"line {i:04d}", flush=True)
        print("burst done", flush=True)
        while True:
            signal.pause()
        """,
    )
    lab.wait_log("chatty", "burst done")
    live = Path(handle.log_path)
    before = live.read_bytes()
    assert len(before) > 1000

    assert lab.sup.rotate_logs(handle)
    assert live.stat().st_size == 0
    rotated = live.with_name("chatty.log.1").read_bytes()
    assert rotated == before[len(before) - len(before) // 2 :]
    assert rotated.endswith(b"line 0099\nburst done\n")

    os.kill(handle.pid, signal.SIGUSR1)
    lab.wait_log("chatty", "after rotate")
    assert live.read_bytes() == b"after rotate\n"  # appended at the new end: no hole of NULs
    assert not lab.sup.rotate_logs(handle)


def test_start_rotates_an_oversized_log_first(small_log_lab: Lab) -> None:
    lab = small_log_lab
    lab.logs.mkdir()
    (lab.logs / "big.log").write_text("old\n" * 500)

    handle = lab.start("big", WAIT_UNTIL_KILLED)

    assert (lab.logs / "big.log.1").read_text() == "old\n" * 250
    assert Path(handle.log_path).read_text().startswith("=== ")
    assert lab.sup.stop(handle) == -signal.SIGTERM


def test_log_tail(lab: Lab) -> None:
    handle = lab.start(
        "talker",
        """
        for i in range(300):
            print(f"line {i}")
        print("done", end="")
        """,
    )
    wait_for(lambda: lab.sup.exit_code(handle) == 0, what="the talker to finish")

    assert lab.sup.log_tail("talker", 3) == ["line 298", "line 299", "done"]
    assert len(lab.sup.log_tail("talker", 1000)) == 302  # header + 300 lines + done
    assert lab.sup.log_tail("talker", 0) == []
    assert lab.sup.log_tail("nobody") == []


def test_log_tail_of_a_big_log_reads_across_blocks(lab: Lab) -> None:
    lab.logs.mkdir()
    (lab.logs / "huge.log").write_text("".join(f"row {i}\n" for i in range(100_000)))

    assert lab.sup.log_tail("huge", 2) == ["row 99998", "row 99999"]
    assert lab.sup.log_tail("huge", 20_000)[0] == "row 80000"


GOOD_HANDLE = {
    "name": "m",
    "pid": 1234,
    "create_time": 1.5,
    "log_path": "/tmp/m.log",
    "started_at": "2026-11-25T05:00:00Z",
}


def test_handle_round_trips_through_json() -> None:
    handle = ProcessHandle.from_json({**GOOD_HANDLE, "create_time": 1700000000.25, "extra": "ignored"})
    assert ProcessHandle.from_json(json.loads(json.dumps(handle.to_json()))) == handle


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected an object"),
        ({"name": "m"}, "missing pid, create_time, log_path, started_at"),
        ({**GOOD_HANDLE, "pid": 0}, "pid must be a positive integer"),
        ({**GOOD_HANDLE, "pid": True}, "pid must be a positive integer"),
        ({**GOOD_HANDLE, "pid": "12"}, "pid must be a positive integer"),
        ({**GOOD_HANDLE, "create_time": "x"}, "create_time must be a non-negative number"),
        ({**GOOD_HANDLE, "create_time": float("nan")}, "create_time must be a non-negative number"),
        ({**GOOD_HANDLE, "name": ""}, "name must be a non-empty string"),
        ({**GOOD_HANDLE, "started_at": "yesterday"}, "started_at must be an ISO-8601 UTC time"),
    ],
)
def test_bad_handle_data_is_rejected_clearly(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProcessHandle.from_json(data)  # type: ignore[arg-type]


def test_stop_after_the_leader_was_reaped_still_stops_what_it_left_in_its_group(lab: Lab) -> None:
    """A wrapper that forked its runtime instead of exec'ing it dies; the monitor reaps it; the runtime it left
    in the group must still be stopped, not left holding the model's port."""
    handle = lab.start("wrapper", """
        import signal, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()", sys.argv[1]])
        print(f"pid {child.pid} .", flush=True)
        signal.pause()
    """)
    lab.wait_log("wrapper", " .")
    child = int(lab.log("wrapper").split("pid ")[1].split()[0])
    child_created = lab.watch(child)
    os.kill(handle.pid, signal.SIGKILL)
    wait_for(lambda: lab.sup.reap() == [handle], what="the leader to be reaped")
    assert psutil.pid_exists(child), "the child outlives its leader"
    assert lab.sup.stop(handle, timeout=2.0) == -signal.SIGKILL
    wait_for(lambda: gone(child, child_created), what="the child left in the group to be stopped")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux derives create times from /proc/stat's btime")
def test_a_runtime_stays_itself_when_the_clock_moves_its_boot_time_by_a_second(lab: Lab, monkeypatch) -> None:
    """psutil reads a process's create time as ticks since boot plus /proc/stat's btime, an integer the kernel
    derives from the wall clock: when NTP adjusts the clock, btime flips by a second. A runtime must not then look
    exited (a start failed as "exited while starting" with its process left running, seen once in CI)."""
    from psutil import _pslinux

    handle = lab.track(lab.sup.start("steady", lab.argv("steady", "import signal\nwhile True:\n    signal.pause()\n")))
    real = _pslinux.boot_time
    monkeypatch.setattr(_pslinux, "boot_time", lambda: real() + 1.0)
    assert lab.sup.alive(handle)
    assert lab.sup.exit_code(handle) is None
