"""Service managers under pressure: concurrent writers of one service file, the gateway's key variables in its
plist and unit (and an installed gateway that accepts the key), and a systemd stop that keeps to the grace."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from athanor.managers.jobs import ingress_job
from athanor.managers.launchd import LaunchdManager, render_plist
from athanor.managers.shared import write_if_changed
from athanor.managers.systemd import SystemdManager, render_unit
from conftest import write
from fixtures.jobs import sleeper_job
from test_launchd import check_plist, needs_plistutil
from test_systemd import needs_analyze, verify

KEYS = {"apiKeyEnv": "ATHANOR_TEST_API_KEY", "adminKeyEnv": "ATHANOR_TEST_ADMIN_KEY"}


def test_concurrent_writers_of_one_service_file_never_fail_and_leave_it_whole(tmp_path):
    """``apply`` and a daemon start writing one file at once: each writer's temp file is its own to rename."""
    path = tmp_path / "units" / "athanor-model-m.service"
    contents = [(f"[Service]\nExecStart=/bin/run-{i}\n" + f"# padding {i}\n" * 2000).encode() for i in range(6)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(contents))

    def writer(i: int) -> None:
        start.wait()
        try:
            for n in range(150):  # alternating contents: almost every call is a real write
                write_if_changed(path, contents[(i + n) % len(contents)])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(contents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [], errors[:3]
    assert path.read_bytes() in contents, "the file is one writer's whole content"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp or lock file left among the units"


def key_environ() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "ATHANOR_TEST_API_KEY": "sk-api 50% $HOME \"q\"",
            "ATHANOR_TEST_ADMIN_KEY": "sk-admin", "UNRELATED_SECRET": "never passed"}


@needs_plistutil
def test_the_gateway_plist_carries_the_key_variables_its_auth_names(tmp_path):
    home = tmp_path / "home"
    job = ingress_job(home, "launchd", environ=key_environ(), auth=KEYS)
    manager = LaunchdManager(tmp_path / "LaunchAgents", home / "launchd")
    [(path, content)] = manager.files(job).items()
    write_if_changed(path, content)
    data = check_plist(path)
    env = data["EnvironmentVariables"]
    assert env["ATHANOR_TEST_API_KEY"] == "sk-api 50% $HOME \"q\"" and env["ATHANOR_TEST_ADMIN_KEY"] == "sk-admin"
    assert "UNRELATED_SECRET" not in env, "only the variables auth names join the whitelist"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "the plist holds keys: its user's alone"
    assert render_plist(ingress_job(home, "launchd", environ=key_environ())) != content


@needs_analyze
def test_the_gateway_unit_carries_the_key_variables_its_auth_names(tmp_path):
    home = tmp_path / "home"
    job = ingress_job(home, "systemd", environ=key_environ(), auth=KEYS)
    manager = SystemdManager(tmp_path / "systemd" / "user")
    [(path, content)] = manager.files(job).items()
    assert content == render_unit(job)
    write_if_changed(path, content)
    verify(tmp_path, path)
    text = path.read_text()
    assert 'Environment="ATHANOR_TEST_API_KEY=sk-api 50%% $HOME \\"q\\""' in text
    assert 'Environment="ATHANOR_TEST_ADMIN_KEY=sk-admin"' in text and "UNRELATED_SECRET" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "the unit holds keys: its user's alone"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_of(url: str, key: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@needs_plistutil
def test_an_installed_gateway_gets_the_key_from_the_installing_shell(home, tmp_path, cli, launchctl, monkeypatch):
    """launchd starts the gateway with the plist's environment alone (the double too): the key must be in it."""
    from test_install import serving_processes, wait_gone

    port = free_port()
    agents = tmp_path / "LaunchAgents"
    spec = write(tmp_path / "gateway.yaml", "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: "
                 f"{{name: default}}\nspec:\n  listen: 127.0.0.1:{port}\n  serviceManager: launchd\n"
                 f"  launchd: {{agentsDir: {json.dumps(str(agents))}}}\n  auth: {{apiKeyEnv: ATHANOR_TEST_API_KEY}}\n")
    assert cli("apply", "-f", str(spec)).returncode == 0
    monkeypatch.setenv("ATHANOR_TEST_API_KEY", "sk-installed")
    try:
        installed = cli("install", "--timeout", "110")  # a bound for a loaded machine, within cli's own 120 s
        assert installed.returncode == 0, installed.stderr + installed.stdout
        url = f"http://127.0.0.1:{port}/v1/models"
        assert status_of(url, "sk-installed") == 200, (home / "logs" / "daemon.log").read_text()[-2000:]
        assert status_of(url, None) == 401 and status_of(url, "sk-wrong") == 401
    finally:
        removed = cli("uninstall")
        assert removed.returncode == 0, removed.stderr
        wait_gone(lambda: not serving_processes(home), "the gateway to end")


def test_install_warns_when_a_key_variable_is_not_set_in_the_installing_shell(home, tmp_path, cli, launchctl,
                                                                          monkeypatch):
    """The installed gateway would refuse every request for want of its key: install says so, and why."""
    from test_install import serving_processes, wait_gone

    port = free_port()
    agents = tmp_path / "LaunchAgents"
    spec = write(tmp_path / "gateway.yaml", "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: "
                 f"{{name: default}}\nspec:\n  listen: 127.0.0.1:{port}\n  serviceManager: launchd\n"
                 f"  launchd: {{agentsDir: {json.dumps(str(agents))}}}\n  auth: {{apiKeyEnv: ATHANOR_TEST_UNSET_KEY}}\n")
    assert cli("apply", "-f", str(spec)).returncode == 0
    monkeypatch.delenv("ATHANOR_TEST_UNSET_KEY", raising=False)
    try:
        installed = cli("install", "--timeout", "110")
        assert installed.returncode == 0, installed.stderr + installed.stdout
        assert "warning: the Gateway's auth names ATHANOR_TEST_UNSET_KEY" in installed.stderr
        assert status_of(f"http://127.0.0.1:{port}/v1/models", "anything") == 503, "what the warning said"
    finally:
        removed = cli("uninstall")
        assert removed.returncode == 0, removed.stderr
        wait_gone(lambda: not serving_processes(home), "the gateway to end")


def run(coro):
    return asyncio.run(coro)


def wait_for_file(path: Path, what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling another process's progress, with a deadline


def test_a_systemd_stop_keeps_to_the_callers_grace_not_the_units_timeout(tmp_path, systemctl):
    """A runtime that ignores SIGTERM, in a unit whose TimeoutStopSec is 300 s: a stop with 0.5 s of grace
    SIGKILLs it then. A blocking ``systemctl stop`` would wait the 300 s (and time out after its own 60)."""
    ready = tmp_path / "sigterm-ignored"
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open(sys.argv[1], 'w').close(); "
            "time.sleep(600)")
    made = dataclasses.replace(sleeper_job(tmp_path, argv=(sys.executable, "-c", code, str(ready))), stop_timeout_s=300)
    manager = SystemdManager(systemctl.config_home / "systemd" / "user")
    handle = run(manager.start(made))
    try:
        wait_for_file(ready, "the runtime to ignore SIGTERM")
        assert run(manager.stop(handle, 0.5)) == -signal.SIGKILL
        assert not run(manager.observe(handle)).running
        assert not psutil.pid_exists(handle["pid"]) or psutil.Process(handle["pid"]).status() == psutil.STATUS_ZOMBIE
        run(manager.stop(handle, 0.5))  # again: nothing left to stop, and no error
    finally:  # the fixture's own clean-up stops units with a blocking stop: this one would take 300 s
        systemctl.systemctl("--user", "kill", "--signal=SIGKILL", made.unit)
