"""launchd: rendered plists against the real validators, and the manager driving the launchctl double.

launchd cannot run on Linux, so ``launchctl`` here is tests/doubles/launchctl_double.py: real processes, the
real exit codes and messages, a bootout that completes after it returns, KeepAlive restarts spaced by
ThrottleInterval. The plists themselves go through plistlib and Debian's plistutil (libplist).
"""

from __future__ import annotations

import asyncio
import os
import plistlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from athanor.managers.base import Job, sorted_env
from athanor.managers.launchd import LaunchdManager, parse_print, render_plist
from conftest import LaunchctlDouble
from fixtures.jobs import sleeper_job as job

# launchd.plist(5): the keys athanor writes, with the type each must have.
DOCUMENTED = {"Label": str, "ProgramArguments": list, "EnvironmentVariables": dict, "WorkingDirectory": str,
              "StandardOutPath": str, "StandardErrorPath": str, "ProcessType": str, "ThrottleInterval": int,
              "ExitTimeOut": int, "KeepAlive": (bool, dict), "RunAtLoad": bool}
AWKWARD = "dir with spaces/\"quotes\" & <angle> $HOME %n ünïcödé"
# scripts/setup.sh --test installs libplist-utils as root; elsewhere these tests say what is missing
needs_plistutil = pytest.mark.skipif(shutil.which("plistutil") is None, reason="plistutil (libplist-utils) missing")


def check_plist(path: Path) -> dict:
    """Parse with plistlib and with plistutil (to binary and back); keys and types as launchd.plist(5) says."""
    with open(path, "rb") as fh:
        data = plistlib.load(fh)
    binary = path.with_suffix(".bin")
    assert subprocess.run(["plistutil", "-i", str(path), "-f", "bin", "-o", str(binary)]).returncode == 0
    with open(binary, "rb") as fh:
        assert plistlib.load(fh) == data, "plistutil reads the same plist"
    for key, value in data.items():
        assert key in DOCUMENTED and isinstance(value, DOCUMENTED[key]), (key, value)
    return data


@pytest.mark.parametrize("kind", ["model", "ingress"])
@needs_plistutil
def test_plists_pass_the_validators_and_keep_every_value_whole(tmp_path, kind):
    awkward = tmp_path / AWKWARD
    awkward.mkdir(parents=True)
    made = Job(kind=kind, name="m" if kind == "model" else "ingress",
               argv=(str(awkward / "llama-server"), "--model", str(awkward / "w.gguf"), "--alias", "a&b<c>'d\""),
               env=sorted_env({"ATHANOR_HOME": str(awkward), "NOTE": "50% of $PATH & <more>"}),
               workdir=str(awkward), log_path=str(awkward / "logs" / "m.log"))
    path = tmp_path / "job.plist"
    path.write_bytes(render_plist(made))
    data = check_plist(path)
    assert data["ProgramArguments"] == list(made.argv)
    assert data["EnvironmentVariables"] == dict(made.env)
    assert data["WorkingDirectory"] == str(awkward) and data["StandardOutPath"] == str(awkward / "logs" / "m.log")
    assert data["Label"] == made.label and data["ProcessType"] == "Interactive"
    if kind == "model":
        assert data["KeepAlive"] == {"SuccessfulExit": False} and "RunAtLoad" not in data
        assert made.label == "dev.athanor.model.m"
    else:
        assert data["KeepAlive"] is True and data["RunAtLoad"] is True and made.label == "dev.athanor.ingress"
    assert render_plist(made) == render_plist(made), "the same job renders to the same bytes"


def test_a_control_character_is_refused_not_written_broken(tmp_path):
    from athanor.errors import AthanorError

    with pytest.raises(AthanorError, match="control character"):
        render_plist(job(tmp_path, argv=("/bin/echo", "bell\x07")))


def test_print_is_parsed_defensively():
    text = ("gui/501/dev.athanor.model.x = {\n\tactive count = 1\n\tstate = running\n\tprogram = /x\n"
            "\truns = 3\n\tpid = 4242\n\tlast terminating signal = Killed: 9\n\tsomething = {\n"
            "\t\tstate = nested\n\t}\n}\n")
    assert parse_print(text) == {"state": "running", "runs": 3, "pid": 4242, "exit_code": -9}
    assert parse_print("\tlast exit code = 1: Operation not permitted\n")["exit_code"] == 1
    assert "exit_code" not in parse_print("\tlast exit code = (never exited)\n")


def run(coro):
    return asyncio.run(coro)


@needs_plistutil
def test_start_observe_stop_through_launchctl(tmp_path, launchctl: LaunchctlDouble):
    manager = LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd")
    made = job(tmp_path, env={"MARK": "set by the plist"},
               argv=(sys.executable, "-c", "import os, time; print(os.environ['MARK'], flush=True); time.sleep(600)"))
    handle = run(manager.start(made))
    assert handle["domain"] == f"gui/{os.getuid()}" and handle["label"] == "dev.athanor.model.tiny"
    check_plist(Path(handle["plist"]))
    state = run(manager.observe(handle))
    assert state.running and state.pid == handle["pid"] and psutil.pid_exists(handle["pid"])
    deadline = time.monotonic() + 10
    while "set by the plist" not in Path(made.log_path).read_text():  # the job's own output, in its log
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run(manager.stop(handle, 5))
    assert launchctl("print", f"gui/{os.getuid()}/{made.label}").returncode == 113, "gone once stop returns"
    assert not psutil.pid_exists(handle["pid"]) or psutil.Process(handle["pid"]).status() == psutil.STATUS_ZOMBIE
    assert "athanor" not in launchctl("print-disabled", f"gui/{os.getuid()}").stdout, "nothing on the disabled list"
    run(manager.stop(handle, 5))  # stopping what is gone is fine (bootout exits 3)
    again = run(manager.start(made))  # enable + bootstrap again after a stop
    assert run(manager.observe(again)).running
    run(manager.stop(again, 5))


def test_the_user_domain_only_without_a_login_session(tmp_path, launchctl: LaunchctlDouble, monkeypatch):
    monkeypatch.setenv("LAUNCHCTL_DOUBLE_SESSION", "Background")
    manager = LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd")
    handle = run(manager.start(job(tmp_path)))
    try:
        assert handle["domain"] == f"user/{os.getuid()}"
    finally:
        run(manager.stop(handle, 5))


def test_a_crash_is_restarted_by_keepalive_and_seen_as_the_end_of_that_process(tmp_path, launchctl):
    manager = LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd")
    made = job(tmp_path)
    handle = run(manager.start(made))
    try:
        os.kill(handle["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:  # KeepAlive {SuccessfulExit: false}: launchd starts it again after ThrottleInterval
            state = run(manager.observe(handle))
            if state.restarts == 1 and state.pid:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert not state.running, "the process the handle named is gone, whatever runs now"
        assert state.pid != handle["pid"] and state.exit_code == -9
    finally:
        run(manager.stop(handle, 5))


def test_a_clean_exit_stays_stopped(tmp_path, launchctl):
    manager = LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd")
    gate = tmp_path / "exit-now"
    handle = run(manager.start(job(tmp_path, argv=exit_at_gate(gate))))
    try:
        assert run(manager.observe(handle)).running, "it exits only once the test says so"
        gate.touch()
        deadline = time.monotonic() + 10
        while run(manager.observe(handle)).running:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        state = run(manager.observe(handle))
        assert state.exit_code == 0 and state.restarts == 0 and state.pid is None
    finally:
        run(manager.stop(handle, 5))


def exit_at_gate(gate: Path) -> tuple[str, ...]:
    """A job that exits cleanly once ``gate`` exists: when the test says so, never after a time of its own."""
    code = "while not __import__('os').path.exists(__import__('sys').argv[1]): __import__('time').sleep(0.02)"
    return (sys.executable, "-c", code, str(gate))  # one line: a unit file's ExecStart cannot carry a newline


def test_launchctl_missing_is_a_clear_error(tmp_path, monkeypatch):
    from athanor.errors import RuntimeNotFoundError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeNotFoundError, match="launchd runs only on macOS"):
        run(LaunchdManager(tmp_path, tmp_path).start(job(tmp_path)))


def test_the_double_behaves_like_launchctl(tmp_path, launchctl: LaunchctlDouble):
    """The exit codes and messages athanor relies on, from the double itself."""
    uid = os.getuid()
    assert launchctl("bootout", f"gui/{uid}/dev.athanor.model.none").returncode == 3
    missing = launchctl("print", f"gui/{uid}/dev.athanor.model.none")
    assert missing.returncode == 113 and "Could not find service" in missing.stderr
    made = job(tmp_path)
    path = tmp_path / "x.plist"
    path.write_bytes(render_plist(made))
    assert launchctl("bootstrap", f"gui/{uid}", str(path)).returncode == 0
    loaded = launchctl("bootstrap", f"gui/{uid}", str(path))
    assert loaded.returncode == 5 and "Input/output error" in loaded.stderr
    assert launchctl("bootout", f"gui/{uid}/{made.label}").returncode == 0
    assert launchctl("print", f"gui/{uid}/{made.label}").returncode in (0, 113), "gone a moment later"


@needs_plistutil
def test_apply_writes_a_plist_per_model_diff_shows_changes_and_delete_removes_it(cli, home, tmp_path):
    from conftest import write
    from fixtures.tiny_models import write_tiny_llama_gguf

    agents = tmp_path / "LaunchAgents"
    model_plists = Path(os.environ["ATHANOR_HOME"]) / "launchd"
    weights = [write_tiny_llama_gguf(tmp_path / "weights" / f"{n}.gguf", seed=i) for i, n in enumerate("ab")]
    spec = write(tmp_path / "spec.yaml", "".join(
        f"---\napiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {n}}}\nspec:\n"
        f"  runtime: llama-server\n  source: {{path: {w}}}\n  preset: {{ctxSize: 256}}\n" for n, w in zip("ab", weights)
    ) + f"---\napiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {{name: default}}\nspec:\n"
        f"  serviceManager: launchd\n  launchd: {{agentsDir: {agents}}}\n")
    applied = cli("apply", "-f", str(spec))
    assert applied.returncode == 0, applied.stderr
    assert "file/dev.athanor.model.a.plist created" in applied.stdout
    plists = sorted(model_plists.glob("*.plist"))
    assert [p.name for p in plists] == ["dev.athanor.model.a.plist", "dev.athanor.model.b.plist"]
    assert not agents.exists(), "model plists never go where launchd loads them at login"
    for path in plists:
        data = check_plist(path)
        assert data["ProgramArguments"][0].endswith("llama-server") and "--ctx-size" in data["ProgramArguments"]
    before = {p: p.read_bytes() for p in plists}
    assert cli("diff", "-f", str(spec)).returncode == 0, "nothing to change"
    spec.write_text(spec.read_text().replace("ctxSize: 256}\n---\napiVersion: athanor.dev/v1alpha1\nkind: Model\n"
                                             "metadata: {name: b}", "ctxSize: 512}\n---\napiVersion: athanor.dev/"
                                             "v1alpha1\nkind: Model\nmetadata: {name: b}", 1))
    shown = cli("diff", "-f", str(spec))
    assert shown.returncode == 1 and "file/dev.athanor.model.a.plist" in shown.stdout and "<string>512</string>" in \
        shown.stdout and "file/dev.athanor.model.b.plist" not in shown.stdout
    assert cli("apply", "-f", str(spec)).returncode == 0
    assert plists[0].read_bytes() != before[plists[0]] and plists[1].read_bytes() == before[plists[1]], \
        "only the changed model's plist is rewritten"
    assert cli("delete", "model", "a").returncode == 0
    assert not plists[0].exists() and plists[1].exists()


def test_a_start_that_fails_after_bootstrap_leaves_nothing_loaded(tmp_path, launchctl: LaunchctlDouble, monkeypatch):
    """A runtime that exits at once: without a bootout, KeepAlive would respawn it every ThrottleInterval."""
    from athanor.managers import launchd

    monkeypatch.setattr(launchd, "GONE_WAIT_S", 5.0)
    manager = LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd")
    made = Job(kind="model", name="dud", argv=(sys.executable, "-c", "raise SystemExit(3)"), env=(),
               workdir=str(tmp_path), log_path=str(tmp_path / "logs" / "dud.log"), stop_timeout_s=1)
    with pytest.raises(launchd.LaunchctlError, match=r"exited at start \(exit code 3\)"):  # not a wait to the end
        run(manager.start(made))
    assert launchctl("print", f"gui/{os.getuid()}/{made.label}").returncode == 113


def test_a_job_left_loaded_by_a_gone_gateway_is_replaced_not_waited_for(tmp_path, launchctl: LaunchctlDouble):
    manager = LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd")
    made = job(tmp_path)
    left = run(manager.start(made))
    fresh = run(LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd").start(made))
    try:
        assert fresh["pid"] != left["pid"] and run(manager.observe(fresh)).running
        assert not psutil.pid_exists(left["pid"]) or psutil.Process(left["pid"]).status() == psutil.STATUS_ZOMBIE
    finally:
        run(manager.stop(fresh, 5))


def test_uninstall_stops_loaded_jobs_whose_plist_is_gone(tmp_path, launchctl: LaunchctlDouble):
    manager = LaunchdManager(tmp_path / "LaunchAgents", tmp_path / "home" / "launchd")
    handle = run(manager.start(job(tmp_path)))
    Path(handle["plist"]).unlink()
    assert run(manager.uninstall()) == ["dev.athanor.model.tiny"]
    assert launchctl("print", f"gui/{os.getuid()}/dev.athanor.model.tiny").returncode == 113
