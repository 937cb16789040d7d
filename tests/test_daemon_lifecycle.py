"""The daemon's lifecycle, with real `athanor serve` processes: one daemon per home (the home's lock), the addresses
its record names (only sockets it holds), addresses retried until they can be bound, a zombie daemon counted as
gone, and a home made private whatever mode it was created with."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ATHANOR, lan_address
from fixtures.serving import Gateway, _descendants_of_home, free_port, wait_until, write_gateway

from athanor.liveness import daemon_record
from athanor.store import open_store
from athanor.store.daemon_lock import hold_daemon_lock

NO_LAN = pytest.mark.skipif(
    lan_address() is None,
    reason="the admin API's own loopback socket exists only for a listen address that is not loopback, and this "
           "machine has no other address to listen on (every 127.x and wildcard address covers loopback itself)")


@contextlib.contextmanager
def occupied(host: str, port: int) -> Iterator[socket.socket]:
    """Another process's listening socket on host:port (this test's, without SO_REUSEADDR)."""
    sock = socket.socket()
    try:
        sock.bind((host, port))
        sock.listen()
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def serving(home: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`athanor serve ARGS` until its record names it; `down`, and nothing with this home left, afterwards."""
    home.mkdir(parents=True, exist_ok=True)
    log = home / "daemon-test.log"
    proc = subprocess.Popen([ATHANOR, "serve", *args], env=dict(os.environ), stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)
    try:
        def started() -> bool:
            assert proc.poll() is None, log.read_text()
            record = daemon_record(open_store(home))
            return record is not None and record["pid"] == proc.pid

        wait_until(started, 60, "the daemon to record itself")
        yield proc
    finally:
        subprocess.run([ATHANOR, "down"], env=dict(os.environ), capture_output=True, timeout=120)
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for leftover in _descendants_of_home(home):
            leftover.kill()
        wait_until(lambda: not _descendants_of_home(home), 10, "leftovers to die")


def record(home: Path) -> dict:
    return json.loads((home / "state.json").read_text())["daemon"]


def events(home: Path, reason: str) -> list[dict]:
    return [e for e in json.loads((home / "state.json").read_text())["events"] if e["reason"] == reason]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def athanor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ATHANOR, *args], env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- the admin address


@NO_LAN
def test_a_busy_loopback_address_is_not_recorded_as_the_admin_api_and_is_taken_once_free(home: Path):
    lan, port = lan_address(), free_port()
    with occupied("127.0.0.1", port) as other, serving(home, "--listen", f"{lan}:{port}"):
        assert record(home)["listen"] == f"{lan}:{port}"
        assert record(home)["admin"] is None, "the record names an admin address another process holds"
        asked = athanor("stop", "anything")
        assert asked.returncode == 1
        assert asked.stderr.count("\n") == 1 and "admin API is not reachable" in asked.stderr, asked.stderr
        with pytest.raises(BlockingIOError):
            other.accept()  # nothing, and so no admin key, went to the other process
        assert answers(f"http://{lan}:{port}/health"), "the gateway serves on its listen address meanwhile"
        other.close()
        wait_until(lambda: record(home)["admin"] == f"127.0.0.1:{port}", 30, "the loopback address to be taken")
        assert answers(f"http://127.0.0.1:{port}/athanor/v1/status")
        asked = athanor("stop", "anything")
        assert "not reachable" not in asked.stderr and "cannot reach" not in asked.stderr, asked.stderr
        assert len(events(home, "ListenFailed")) == 1, "said once"


@NO_LAN
def test_moving_from_loopback_to_a_lan_address_on_the_same_port_keeps_the_admin_api(home: Path, tmp_path: Path):
    lan, port = lan_address(), free_port()
    home.mkdir(parents=True)
    write_gateway(tmp_path, f"  listen: 127.0.0.1:{port}\n")
    with serving(home) as proc:
        write_gateway(tmp_path, f"  listen: {lan}:{port}\n")
        wait_until(lambda: record(home)["listen"] == f"{lan}:{port}", 30, "the gateway to move")
        assert record(home)["admin"] == f"127.0.0.1:{port}" and record(home)["pid"] == proc.pid
        assert answers(f"http://127.0.0.1:{port}/athanor/v1/status"), "the admin API answers where recorded"
        assert answers(f"http://{lan}:{port}/health")
        assert not events(home, "ListenFailed")


def test_a_busy_listen_address_is_taken_once_it_is_free_without_a_spec_change(home: Path, tmp_path: Path):
    first, second = free_port(), free_port()
    home.mkdir(parents=True)
    write_gateway(tmp_path, f"  listen: 127.0.0.1:{first}\n")
    with occupied("127.0.0.1", second) as other, serving(home, "-v"):
        write_gateway(tmp_path, f"  listen: 127.0.0.1:{second}\n")
        wait_until(lambda: events(home, "ListenFailed"), 30, "the failure to be said")
        log = home / "daemon-test.log"
        retried = f"again: cannot listen on 127.0.0.1:{second}"
        wait_until(lambda: log.read_text().count(retried) >= 2, 60, "two more tries that fail")
        other.close()
        wait_until(lambda: record(home)["listen"] == f"127.0.0.1:{second}", 60, "the freed address to be taken")
        assert answers(f"http://127.0.0.1:{second}/health")
        wait_until(lambda: [e for e in events(home, "Listening") if f"127.0.0.1:{second}" in e["message"]], 30,
                   "the move to be said")
        assert len(events(home, "ListenFailed")) == 1, "a failure is said once per streak"


# ---------------------------------------------------------------------------------------------- one daemon per home


def test_a_second_daemon_on_the_same_home_refuses_to_start_and_the_first_keeps_serving(gateway: Gateway):
    port = int(gateway.url.rsplit(":", 1)[1])
    wait_until(lambda: (gateway.state()["daemon"] or {}).get("pid") == gateway.proc.pid, 30, "the first's record")
    before = gateway.state()["daemon"]
    for listen in (f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"):
        second = athanor("serve", "--listen", listen)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {gateway.proc.pid}" in lines[0] and f"127.0.0.1:{port}" in lines[0], lines[0]
        assert "already running" in lines[0]
    assert gateway.proc.poll() is None
    assert gateway.status()["instances"] is not None
    assert [m.id for m in gateway.client.models.list().data], "a request through the first still answers"
    assert gateway.state()["daemon"] == before, "the record still names the first"
    assert not [e for e in gateway.state()["events"] if "re-attach" in e["message"]]


def test_up_while_another_daemon_holds_the_home_says_so(home: Path):
    home.mkdir(parents=True)
    port = free_port()
    lock = hold_daemon_lock(open_store(home), f"127.0.0.1:{port}")  # a daemon between its lock and its record
    try:
        assert athanor("get", "models").returncode == 0, "the store's commands do not need the daemon's lock"
        up = athanor("up", "--listen", f"127.0.0.1:{free_port()}", "--timeout", "600", timeout=120)
        assert up.returncode == 1, up.stdout + up.stderr
        assert f"pid {os.getpid()}" in up.stderr and "already running" in up.stderr, up.stderr
        assert up.stderr.count("\n") == 1, up.stderr
        assert daemon_record(open_store(home)) is None
    finally:
        os.close(lock)
        athanor("down")
        for leftover in _descendants_of_home(home):
            leftover.kill()


def test_serve_on_a_busy_address_says_so_in_one_line(home: Path):
    home.mkdir(parents=True)
    port = free_port()
    with occupied("127.0.0.1", port):
        result = athanor("serve", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"athanor: cannot listen on 127.0.0.1:{port}: Address already in use", result.stderr
    state = home / "state.json"
    assert not state.exists() or json.loads(state.read_text())["daemon"] is None, "nothing recorded"


# ---------------------------------------------------------------------------------------------- a zombie daemon


def test_a_killed_daemon_not_yet_reaped_counts_as_gone(home: Path):
    store = open_store(home)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with store.state.edit() as state:
            state["daemon"] = {"pid": child.pid, "createTime": psutil.Process(child.pid).create_time(),
                               "listen": "127.0.0.1:9", "admin": "127.0.0.1:9", "manager": "process"}
        assert daemon_record(store) is not None
        child.send_signal(signal.SIGKILL)  # and not waited for: a zombie until this test reaps it
        wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10, "the child to die")
        assert daemon_record(store) is None
        assert "the gateway is not running" in athanor("stop", "anything").stderr
    finally:
        child.kill()
        child.wait(10)


# ---------------------------------------------------------------------------------------------- the home's mode


def test_an_existing_home_made_0755_is_tightened_to_0700(home: Path):
    home.mkdir(parents=True)
    os.chmod(home, 0o755)
    assert athanor("get", "models").returncode == 0
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
