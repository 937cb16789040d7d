"""Faults, each provoked for real: real runtimes (or a small real program in a runtime's place), real signals,
a real daemon, and the service managers the tests can drive (the embedded supervisor, launchd's double, systemd
in a container).

- A runtime killed (SIGKILL) mid-stream: the client's stream ends with the error at once, the next request
  restarts the model, and /metrics counts the request, the crash and the restart once each.
- A runtime that exits at start (a corrupt GGUF whose header reads fine): ``CRASH_LIMIT`` failed starts, then
  ``Failed`` with a message that says so; no start after that, however many requests come, and under launchd and
  systemd no respawn by the manager either (the runtime's own log counts its runs).
- A runtime that ignores SIGTERM is SIGKILLed once the stop timeout has passed.
- A daemon killed with -9 comes back without reloading its runtimes (same PID, no new start). Under launchd and
  systemd the manager restarts the installed gateway itself. The embedded supervisor has nothing above it that
  would: ``athanor up`` starts a detached daemon and nobody watches it, so there the test restarts it by hand
  (the ``process`` case of ``test_a_daemon_killed_with_sigkill_and_restarted_by_hand_reattaches``).
- A PID that state.json records but that now belongs to a foreign process is neither killed nor adopted.

Where one of these already had an exact test elsewhere, it was moved here, so each fault is held once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from conftest import ATHANOR
from fixtures.serving import (
    MANAGERS,
    Gateway,
    apply_gateway,
    apply_models,
    chat,
    long_gguf,
    model_spec,
    start_daemon,
    wait_until,
)
from fixtures.tiny_models import write_tiny_llama_gguf
from test_install import answer, runtimes, serving_processes, setup_spec, wait_gone

from athanor.controller.failures import CRASH_LIMIT
from athanor.controller.stopping import STOP_TIMEOUT_S

CHAT = "/v1/chat/completions"
DEAF_RUNTIME = Path(__file__).resolve().parent.parent / "fixtures" / "sigterm_deaf_runtime.py"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the gateway's /metrics, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def counted(samples: dict, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` whose labels include ``labels`` (the others free), by their full label set."""
    return {key: value for (sample, key), value in samples.items()
            if sample == name and set(labels.items()) <= set(key)}


def starts(state: dict, name: str) -> int:
    """How many runtimes of ``name`` were spawned, by state.json's events (from Standby or from Failed alike; a
    re-attach passes through Starting too, but spawns nothing)."""
    return len([e for e in state["events"] if e["name"] == name and e["reason"] == "Starting"
                and "re-attaching" not in e["message"]])


def reattached(state: dict, name: str, pid: int) -> int:
    """How many times a daemon adopted ``name``'s runtime ``pid``, by state.json's events."""
    return len([e for e in state["events"]
                if e["name"] == name and e["message"].endswith(f"re-attached to pid {pid}")])


# ---------------------------------------------------------------------------------------------- killed mid-stream


@pytest.mark.parametrize("model", ["tiny-gguf", "tiny-mlx"])  # chunked, and HTTP/1.0 ended by the connection
@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_runtime_killed_mid_stream_fails_promptly_and_recovers(gateway, model, tmp_path):
    """(Moved from test_serving.py; the metrics are new.)"""
    # A long answer, so the kill surely lands mid-stream: the fixture's models stop after 8 tokens, and the tiny
    # GGUF's own context (256) would end any answer within a blink.
    if model == "tiny-gguf":
        model = long_gguf(tmp_path)
    else:
        assert gateway.athanor("preset", "set", model, "maxTokens=100000").returncode == 0
    chat(gateway.client, model)
    pid = gateway.runtime_pid(model)
    stream = gateway.client.chat.completions.create(  # ignore_eos: a random model may end at any token
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=100000, stream=True,
        extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.model == model
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="failed mid-request"):  # the death seen, not a read timeout's 504
        for _ in stream:
            pass
    reply = chat(gateway.client, model)
    assert reply.model == model
    assert gateway.runtime_pid(model) != pid
    samples = scrape(gateway.url)
    requests = counted(samples, "athanor_requests_total", model=model, route=CHAT)
    assert sum(requests.values()) == 3, f"three requests, each counted once: {requests}"
    assert requests.get((("model", model), ("route", CHAT), ("status", "200")), 0) >= 2, requests
    assert counted(samples, "athanor_failures_total", model=model) == {
        (("model", model), ("reason", "Crashed")): 1}, "one crash, counted once"
    assert counted(samples, "athanor_load_seconds_count", model=model) == {(("model", model),): 2}, \
        "the first load and one restart"
    assert starts(gateway.recorded(), model) == 2


# ---------------------------------------------------------------------------------------------- exits at start


def corrupt_gguf(path: Path) -> Path:
    """A GGUF whose header, sizes and metadata all read fine (so discovery and preflight let it through), but one
    of whose tensors is misnamed: llama-server exits at load ("tensor ... not found"), the way a damaged file fails."""
    write_tiny_llama_gguf(path, seed=5)
    data = path.read_bytes()
    assert data.count(b"blk.0.attn_q.weight") == 1
    path.write_bytes(data.replace(b"blk.0.attn_q.weight", b"blk.0.attn_#.weight"))
    return path


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)  # launchd and systemd restart failed jobs themselves
def test_a_runtime_that_exits_at_start_ends_failed_after_the_crash_limit_and_is_not_restarted(gateway, tmp_path):
    apply_models(tmp_path / "corrupt.yaml", model_spec("corrupt", corrupt_gguf(tmp_path / "weights" / "corrupt.gguf")))
    for attempt in range(1, CRASH_LIMIT + 1):  # each request waits out the backoff, then starts it once more
        with pytest.raises(openai.APIStatusError) as err:
            chat(gateway.client, "corrupt")
        assert err.value.status_code == 503 and "failed to start" in err.value.message, err.value.message
        assert starts(gateway.recorded(), "corrupt") == attempt
    for _ in range(3):  # from now on refused at once, with the reason, and nothing is spawned
        for stream in (False, True):
            status, body = gateway.post(CHAT, json.dumps(
                {"model": "corrupt", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode())
            assert status == 503, body
            assert f"failed {CRASH_LIMIT} times" in body["error"]["message"], body
            assert "athanor restart corrupt" in body["error"]["message"]
    state = gateway.recorded()
    assert starts(state, "corrupt") == CRASH_LIMIT, "no start after the limit"
    # Spawns counted by the runtime itself (each says so as it exits), whoever spawned it: the controller, or a
    # service manager restarting a job that failed.
    log = (gateway.home / "logs" / "corrupt.log").read_text()
    assert log.count("exiting due to model loading error") == CRASH_LIMIT, "spawned exactly CRASH_LIMIT times"
    assert "tensor 'blk.0.attn_q.weight' not found" in log
    assert not gateway.job_loaded("corrupt"), "its job is not left to its manager to restart"
    record = state["instances"]["corrupt"]
    assert record["phase"] == "Failed" and "handle" not in record
    assert record["lastFailure"]["reason"] == "StartFailed", record
    described = gateway.athanor("describe", "model", "corrupt").stdout
    assert "Phase:        Failed" in described and "Last failure: StartFailed" in described
    if gateway.manager == "process":  # under launchd and systemd the job is gone before a handle to it is made
        assert record["lastFailure"]["exitCode"] == 1, record
        assert "failed to load model" in described, "the log tail shows why"
    elif gateway.manager == "launchd":
        assert "dev.athanor.model.corrupt exited at start (exit code 1)" in record["lastFailure"]["message"], record
    else:
        assert "did not start" in record["lastFailure"]["message"], record
        assert "see 'athanor logs corrupt'" in record["lastFailure"]["message"], record
    samples = scrape(gateway.url)
    assert counted(samples, "athanor_failures_total", model="corrupt") == {
        (("model", "corrupt"), ("reason", "StartFailed")): CRASH_LIMIT}
    assert not counted(samples, "athanor_load_seconds_count", model="corrupt"), "never ready"
    assert gateway.phase("tiny-gguf") == "Standby" and chat(gateway.client, "tiny-gguf").model == "tiny-gguf", \
        "the other models are unaffected"


# ---------------------------------------------------------------------------------------------- deaf to SIGTERM


def test_a_runtime_that_ignores_sigterm_is_sigkilled_after_the_stop_timeout(gateway, tmp_path):
    runtime = tmp_path / "deaf-llama-server"
    runtime.write_text(f"#!/bin/sh\nexec {sys.executable} {DEAF_RUNTIME} \"$@\"\n")
    runtime.chmod(0o755)
    apply_gateway(gateway, tmp_path, f"  runtimes: {{llama-server: {{path: {json.dumps(str(runtime))}}}}}\n")
    assert gateway.athanor("start", "tiny-gguf").stdout.strip() == "model/tiny-gguf ready"
    pid = gateway.runtime_pid("tiny-gguf")
    deaf = psutil.Process(pid)
    assert str(DEAF_RUNTIME) in deaf.cmdline(), "the deaf program runs in llama-server's place"
    log = gateway.home / "logs" / "tiny-gguf.log"
    began = time.monotonic()
    stopping = subprocess.Popen([ATHANOR, "stop", "tiny-gguf"], env=gateway.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "ignored SIGTERM" in log.read_text(), 30, "the runtime to be sent SIGTERM")
        assert deaf.is_running() and deaf.status() != psutil.STATUS_ZOMBIE, "SIGTERM did not end it"
        out, err = stopping.communicate(timeout=STOP_TIMEOUT_S + 60)
    finally:
        if stopping.poll() is None:
            stopping.kill()
            stopping.wait(30)
    took = time.monotonic() - began
    assert stopping.returncode == 0 and out.strip() == "model/tiny-gguf standby", err
    assert not deaf.is_running() or deaf.status() == psutil.STATUS_ZOMBIE, "SIGKILL, the only way to end it, did"
    assert took >= STOP_TIMEOUT_S, f"SIGKILL came after {took:.1f} s, before the {STOP_TIMEOUT_S:g} s grace"
    assert gateway.phase("tiny-gguf") == "Standby" and gateway.runtime_pid("tiny-gguf") is None


# ---------------------------------------------------------------------------------------------- daemon killed


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_a_daemon_killed_with_sigkill_and_restarted_by_hand_reattaches(gateway):
    """The daemon run by hand (the embedded supervisor's only way: nothing restarts an ``athanor up`` daemon),
    its models under each manager. (Moved from test_serving.py; the start count is new.)"""
    chat(gateway.client, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    assert starts(gateway.recorded(), "tiny-gguf") == 1
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    assert psutil.pid_exists(pid), "runtimes outlive the daemon"
    shown = json.loads(gateway.athanor("get", "models", "tiny-gguf", "-o", "json").stdout)["status"]
    assert shown["phase"] == "Unknown", "a record of a dead gateway is not shown as Ready"
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.proc = start_daemon(gateway.home, port)
    assert chat(gateway.client, "tiny-gguf").model == "tiny-gguf"
    assert gateway.runtime_pid("tiny-gguf") == pid, "re-attached, not restarted"
    state = gateway.recorded()
    assert starts(state, "tiny-gguf") == 1 and reattached(state, "tiny-gguf", pid) == 1, "no new start"


def _killed_and_restarted_by_its_manager(home: Path, port: int, weights: Path) -> None:
    """Kill the installed gateway with SIGKILL; its manager must start it again, and the new one adopt the runtime
    the old one started: same PID, no second start."""
    assert answer(port) == "tiny"
    [runtime] = runtimes(weights)
    [daemon] = serving_processes(home)
    state = json.loads((home / "state.json").read_text())
    assert starts(state, "tiny") == 1
    daemon.kill()
    wait_gone(lambda: [p.pid for p in serving_processes(home)] not in ([], [daemon.pid]),
              "the manager to start the gateway again", timeout=60)
    wait_until(lambda: _answers(port), 60, "the restarted gateway to serve")
    assert answer(port) == "tiny"
    assert [p.pid for p in runtimes(weights)] == [runtime.pid], "the same runtime, re-attached"
    def adoptions() -> int:  # the daemon's own PID for the runtime: under systemd, the container's
        events = json.loads((home / "state.json").read_text())["events"]
        return len([e for e in events if e["name"] == "tiny" and "re-attached to pid" in e["message"]])

    wait_until(adoptions, 10, "state.json to record the re-attach")
    assert adoptions() == 1
    assert starts(json.loads((home / "state.json").read_text()), "tiny") == 1, "no new start"


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_a_daemon_killed_with_sigkill_is_restarted_by_launchd_and_reattaches(home, tmp_path, cli, launchctl):
    agents = tmp_path / "LaunchAgents"
    port, weights = setup_spec(tmp_path, cli, f"  serviceManager: launchd\n  launchd: {{agentsDir: {agents}}}\n")
    try:
        installed = cli("install")
        assert installed.returncode == 0, installed.stderr + installed.stdout
        _killed_and_restarted_by_its_manager(home, port, weights)
        printed = launchctl("print", f"gui/{os.getuid()}/dev.athanor.ingress").stdout
        assert "runs = 2" in printed and "last terminating signal = Killed: 9" in printed, printed
    finally:
        removed = cli("uninstall")
        assert removed.returncode == 0, removed.stderr
        wait_gone(lambda: not runtimes(weights) and not serving_processes(home), "every process to end")


def test_a_daemon_killed_with_sigkill_is_restarted_by_systemd_and_reattaches(home, tmp_path, cli, systemctl):
    port, weights = setup_spec(tmp_path, cli, "  serviceManager: systemd\n")
    try:
        installed = cli("install")
        assert installed.returncode == 0, installed.stderr + installed.stdout
        _killed_and_restarted_by_its_manager(home, port, weights)
        shown = systemctl.systemctl("--user", "show", "-p", "NRestarts", "athanor-ingress.service").stdout
        assert shown.strip() == "NRestarts=1", shown
    finally:
        removed = cli("uninstall")
        assert removed.returncode == 0, removed.stderr
        wait_gone(lambda: not runtimes(weights) and not serving_processes(home), "every process to end")


# ---------------------------------------------------------------------------------------------- a reused PID


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A process that is none of athanor's: it waits for its stdin to close, so the test ends it."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(30)


def hand_the_recorded_pid_to(home: Path, name: str, foreign: subprocess.Popen) -> None:
    """Rewrite ``name``'s record in state.json (no daemon running) as if its runtime's PID now were ``foreign``'s:
    the PID recorded, the start time not (an hour apart: a PID comes round again only once the PID space wraps,
    and identity allows the clock 1.5 s of slack)."""
    path = home / "state.json"
    state = json.loads(path.read_text())
    record = state["instances"][name]
    assert record["phase"] == "Ready" and record["handle"]["pid"] == record["pid"], record
    record["handle"].update(pid=foreign.pid, create_time=psutil.Process(foreign.pid).create_time() - 3600)
    record["pid"] = foreign.pid
    path.write_text(json.dumps(state))


def kill_daemon_and_runtime(gateway: Gateway, name: str) -> int:
    """SIGKILL the daemon, then the runtime it left (its PID is free for another program); returns that PID."""
    runtime = psutil.Process(gateway.runtime_pid(name))
    gateway.recorded()
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    runtime.kill()
    runtime.wait(30)
    return runtime.pid


def test_a_recorded_pid_now_held_by_a_foreign_process_is_neither_killed_nor_adopted(gateway, foreign):
    chat(gateway.client, "tiny-gguf")
    first = kill_daemon_and_runtime(gateway, "tiny-gguf")
    hand_the_recorded_pid_to(gateway.home, "tiny-gguf", foreign)
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.proc = start_daemon(gateway.home, port)
    assert gateway.phase("tiny-gguf") == "Standby" and gateway.runtime_pid("tiny-gguf") is None, "not adopted"
    assert foreign.poll() is None, "not killed"
    assert chat(gateway.client, "tiny-gguf").model == "tiny-gguf"
    fresh = gateway.runtime_pid("tiny-gguf")
    assert fresh not in (foreign.pid, first), "started fresh"
    assert starts(gateway.recorded(), "tiny-gguf") == 2
    assert foreign.poll() is None and psutil.Process(foreign.pid).status() != psutil.STATUS_ZOMBIE
    # `athanor down` without a daemon stops what a dead one left recorded (the other reader of those PIDs).
    kill_daemon_and_runtime(gateway, "tiny-gguf")
    hand_the_recorded_pid_to(gateway.home, "tiny-gguf", foreign)
    down = gateway.athanor("down")
    assert down.returncode == 0 and f"pid {foreign.pid}" not in down.stdout, down.stdout + down.stderr
    assert foreign.poll() is None and psutil.Process(foreign.pid).status() != psutil.STATUS_ZOMBIE, "not killed"
    assert "handle" not in gateway.state()["instances"]["tiny-gguf"], "the stale record is cleared"
