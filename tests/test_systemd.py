"""systemd --user: rendered units against systemd-analyze, and the manager driving a real user manager.

The manager here is real systemd, booted in a container (fixtures/systemd_host.py); ``systemctl`` reaches it
through a bridge that only enters the container and reports host PIDs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from athanor.managers.base import Job, sorted_env
from athanor.managers.systemd import SystemdManager, quote, render_unit
from fixtures.jobs import sleeper_job as job
from test_launchd import exit_at_gate

AWKWARD = "dir with spaces/\"quotes\" & <angle> $HOME %n ünïcödé \\back"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")


def verify(tmp_path: Path, *units: Path) -> None:
    """systemd-analyze verify --user, with nothing at all on stderr."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(exist_ok=True)
    result = subprocess.run(["systemd-analyze", "verify", "--user", *map(str, units)], capture_output=True,
                            text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_analyze
@pytest.mark.parametrize("kind", ["model", "ingress"])
def test_units_pass_systemd_analyze_verify(tmp_path, kind):
    awkward = tmp_path / AWKWARD
    awkward.mkdir(parents=True)
    made = Job(kind=kind, name="m" if kind == "model" else "ingress",
               argv=(sys.executable, "-c", "print('50% of $HOME')", "a&b<c>'d\"", "\\x"),
               env=sorted_env({"ATHANOR_HOME": str(awkward), "NOTE": "50% of $PATH & <more> \\"}),
               workdir=str(awkward), log_path=str(awkward / "logs" / "m.log"))
    unit = tmp_path / made.unit
    unit.write_bytes(render_unit(made))
    verify(tmp_path, unit)
    text = unit.read_text()
    if kind == "model":
        assert made.unit == "athanor-model-m.service" and "Restart=on-failure" in text
        assert text.index("StartLimitBurst") < text.index("[Service]"), "the start limit is read in [Unit] only"
        assert "KillMode=mixed" in text and "TimeoutStopSec=" in text
    else:
        assert made.unit == "athanor-ingress.service" and "Restart=always" in text and "WantedBy=default.target" in text
    assert render_unit(made) == render_unit(made), "the same job renders to the same bytes"


def test_quoting_follows_systemd_rules():
    assert quote("a b") == '"a b"'
    assert quote('say "hi" \\ 100%') == '"say \\"hi\\" \\\\ 100%%"'
    assert quote("$HOME", expand=True) == '"$$HOME"' and quote("$HOME") == '"$HOME"'
    assert quote("tab\there") == '"tab\\x09here"'
    from athanor.errors import AthanorError

    with pytest.raises(AthanorError, match="newline"):
        quote("two\nlines")


def run(coro):
    return asyncio.run(coro)


def test_awkward_values_reach_the_process_unchanged(tmp_path, systemctl):
    """What the unit says is what the runtime gets: argv and environment, through systemd's own unquoting."""
    awkward = tmp_path / AWKWARD
    awkward.mkdir(parents=True)
    out = awkward / "seen.txt"
    code = ("import json, os, sys, time; open(sys.argv[1], 'w').write(json.dumps([sys.argv[2:], os.environ['NOTE'], "
            "os.getcwd()])); time.sleep(600)")
    args = ("a&b<c>'d\"", "50% of $HOME", "\\back", "ünï")
    made = job(awkward, argv=(sys.executable, "-c", code, str(out), *args), env={"NOTE": "5% $PATH \"q\" \\ ü"})
    manager = SystemdManager(systemctl.config_home / "systemd" / "user")
    handle = run(manager.start(made))
    try:
        deadline = time.monotonic() + 10
        while not out.exists() or not out.read_text():
            assert time.monotonic() < deadline, "the unit did not run"
            time.sleep(0.02)
        import json

        assert json.loads(out.read_text()) == [list(args), "5% $PATH \"q\" \\ ü", str(awkward)]
    finally:
        run(manager.stop(handle, 5))


def test_start_observe_stop_through_the_real_manager(tmp_path, systemctl):
    manager = SystemdManager(systemctl.config_home / "systemd" / "user")
    made = job(tmp_path)
    handle = run(manager.start(made))
    assert handle["unit"] == "athanor-model-tiny.service"
    state = run(manager.observe(handle))
    assert state.running and state.pid == handle["pid"]
    proc = psutil.Process(handle["pid"])
    assert proc.cmdline()[:2] == [sys.executable, "-c"], "the host PID of the real process"
    run(manager.stop(handle, 5))
    assert not run(manager.observe(handle)).running
    assert not psutil.pid_exists(handle["pid"]) or psutil.Process(handle["pid"]).status() == psutil.STATUS_ZOMBIE
    run(manager.stop(handle, 5))  # again: nothing to stop


def test_a_crash_is_restarted_by_systemd_and_seen_as_the_end_of_that_process(tmp_path, systemctl):
    manager = SystemdManager(systemctl.config_home / "systemd" / "user")
    handle = run(manager.start(job(tmp_path)))
    try:
        os.kill(handle["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:  # Restart=on-failure, after RestartSec
            state = run(manager.observe(handle))
            if state.restarts >= 1 and state.pid and state.pid != handle["pid"]:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert not state.running, "the process the handle named is gone, whatever runs now"
    finally:
        run(manager.stop(handle, 5))


def test_a_clean_exit_stays_stopped(tmp_path, systemctl):
    manager = SystemdManager(systemctl.config_home / "systemd" / "user")
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
        assert state.exit_code == 0 and state.restarts == 0
    finally:
        run(manager.stop(handle, 5))
