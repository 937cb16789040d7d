"""The Gateway's second listener for Ollama's clients (``spec.ollama.listen``), with a real ``athanor serve``: the
same front door and guard on both ports, the address followed as the spec changes, and an address another
program holds (a real Ollama on 11434, say) said as a Warning and retried while the main port serves."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ATHANOR, lan_address, write
from fixtures.serving import (Gateway, apply_gateway, free_port, shut_down, start_daemon, wait_until,
                              write_gateway)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def recorded_ollama(gateway: Gateway) -> str | None:
    return (gateway.state()["daemon"] or {}).get("ollama")


def events(gateway: Gateway, reason: str) -> list[dict]:
    return [e for e in gateway.state()["events"] if e["kind"] == "Gateway" and e["reason"] == reason]


@contextlib.contextmanager
def occupied(port: int) -> Iterator[socket.socket]:
    """Another program listening on 127.0.0.1:port (this test's socket, without SO_REUSEADDR)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def serving(home: Path, port: int) -> Iterator[Gateway]:
    """``athanor serve --listen 127.0.0.1:PORT`` started on the Gateway spec already applied; ``down`` and nothing
    with this home left afterwards."""
    gateway = Gateway(f"http://127.0.0.1:{port}", home, start_daemon(home, port), dict(os.environ))
    try:
        wait_until(lambda: (gateway.state().get("daemon") or {}).get("pid") == gateway.proc.pid, 60,
                   "the daemon to record itself")
        yield gateway
    finally:
        shut_down(gateway)


def test_both_ports_answer_both_apis_behind_one_guard(gateway: Gateway, tmp_path: Path):
    """``serve --listen`` (the fixture's) overrides only the main address: the spec's Ollama address is served."""
    keys = write(tmp_path / "api-keys", "sk-ollama-test\n")
    keys.chmod(0o600)
    second = free_port()
    apply_gateway(gateway, tmp_path, f"  ollama: {{listen: 127.0.0.1:{second}}}\n"
                                     f"  auth: {{apiKeyFile: {json.dumps(str(keys))}}}\n")
    wait_until(lambda: recorded_ollama(gateway) == f"127.0.0.1:{second}", 30, "the second address to be recorded")
    other = f"http://127.0.0.1:{second}"
    assert get(other + "/health") == get(gateway.url + "/health") and get(other + "/health")[0] == 200
    authorized = {"Authorization": "Bearer sk-ollama-test"}
    main_models, second_models = get(gateway.url + "/v1/models", authorized), get(other + "/v1/models", authorized)
    assert main_models[0] == 200 and main_models == second_models, "the same app answers on both"
    assert get(gateway.url + "/api/tags", authorized) == get(other + "/api/tags", authorized)
    assert get(other + "/api/version", authorized)[0] == 200

    status, body = get(other + "/health", {"Host": f"127.0.0.1:{second}"})
    assert status == 200, body
    status, body = get(other + "/health", {"Host": f"evil.example:{second}"})
    assert status == 403 and b"DNS-rebinding" in body, body
    status, body = get(other + "/v1/models", {**authorized, "Origin": "https://evil.example"})
    assert status == 403 and b"cross-site" in body, body
    assert get(other + "/v1/models")[0] == 401, "the API key is required on the second port too"
    status, body = get(other + "/api/tags")  # and on Ollama's paths, answered in Ollama's shape
    assert status == 401 and list(json.loads(body)) == ["error"], body
    request = urllib.request.Request(other + "/api/chat", method="POST",
                                     data=json.dumps({"model": "tiny-gguf", "messages": []}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:  # the front door's own path checks it too
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401 and "key" in json.loads(refused.value.read())["error"]

    table = gateway.athanor("get", "gateway")
    assert table.returncode == 0 and f"127.0.0.1:{second}" in table.stdout.splitlines()[1], table.stdout
    assert "not bound" not in table.stdout
    shown = json.loads(gateway.athanor("get", "gateway", "-o", "json").stdout)
    assert shown["status"]["ollama"] == f"127.0.0.1:{second}"
    assert shown["spec"]["ollama"] == {"listen": f"127.0.0.1:{second}"}


def test_every_interface_admits_this_machines_names_and_refuses_foreign_ones(gateway: Gateway, tmp_path: Path):
    """A wildcard second address serves Host values naming this machine (as a wildcard main address does), while
    the main address stays on loopback; a foreign Host is refused there all the same."""
    second = free_port()
    apply_gateway(gateway, tmp_path, f"  ollama: {{listen: 0.0.0.0:{second}}}\n")
    wait_until(lambda: recorded_ollama(gateway) == f"0.0.0.0:{second}", 30, "the wildcard address to be served")
    url = f"http://127.0.0.1:{second}/health"
    status, body = get(url, {"Host": f"{socket.gethostname()}:{second}"})
    assert status == 200, body
    lan = lan_address()
    if lan is not None:  # reached through another interface, with the Host a client there sends
        status, body = get(f"http://{lan}:{second}/health")
        assert status == 200, body
    status, body = get(url, {"Host": f"evil.example:{second}"})
    assert status == 403 and b"DNS-rebinding" in body, body


def test_a_new_second_address_is_followed_and_a_removed_one_closed(gateway: Gateway, tmp_path: Path):
    first, second = free_port(), free_port()
    apply_gateway(gateway, tmp_path, f"  ollama: {{listen: 127.0.0.1:{first}}}\n")
    wait_until(lambda: recorded_ollama(gateway) == f"127.0.0.1:{first}", 30, "the first address to be served")
    assert get(f"http://127.0.0.1:{first}/health")[0] == 200

    apply_gateway(gateway, tmp_path, f"  ollama: {{listen: 127.0.0.1:{second}}}\n")
    wait_until(lambda: recorded_ollama(gateway) == f"127.0.0.1:{second}", 30, "the move to be recorded")
    assert get(f"http://127.0.0.1:{second}/health")[0] == 200
    assert not accepts(first), "the old address is closed"
    wait_until(lambda: any(f"127.0.0.1:{second}" in e["message"] for e in events(gateway, "Listening")), 10,
               "the move to be said")

    apply_gateway(gateway, tmp_path, "  idleTimeout: 30m\n")  # spec.ollama gone
    wait_until(lambda: recorded_ollama(gateway) is None, 30, "the removal to be recorded")
    assert not accepts(second), "no second listener once spec.ollama is gone"
    assert get(gateway.url + "/health")[0] == 200, "the main address serves on"
    wait_until(lambda: events(gateway, "ListenStopped"), 10, "the removal to be said")
    assert not events(gateway, "ListenFailed")


def test_a_busy_second_address_at_start_warns_and_is_taken_once_free(home: Path, tmp_path: Path):
    """A real Ollama on the port must not keep the gateway from serving its main address: a Warning, a retry."""
    main, second = free_port(), free_port()
    home.mkdir(parents=True)
    write_gateway(tmp_path, f"  ollama: {{listen: 127.0.0.1:{second}}}\n")
    with occupied(second) as other, serving(home, main) as gateway:
        assert get(gateway.url + "/health")[0] == 200, "the main address serves"
        assert recorded_ollama(gateway) is None, "the record names only sockets the daemon holds"
        wait_until(lambda: events(gateway, "ListenFailed"), 30, "the failure to be said")
        failed = events(gateway, "ListenFailed")
        assert len(failed) == 1 and failed[0]["type"] == "Warning", failed
        assert f"127.0.0.1:{second}" in failed[0]["message"] and "Ollama" in failed[0]["message"], failed
        assert f"127.0.0.1:{main}" in failed[0]["message"], "it says where the gateway serves meanwhile"
        assert f"127.0.0.1:{second} (not bound now" in gateway.athanor("get", "gateway").stdout

        other.close()
        wait_until(lambda: recorded_ollama(gateway) == f"127.0.0.1:{second}", 60, "the freed address to be taken")
        assert get(f"http://127.0.0.1:{second}/health")[0] == 200
        wait_until(lambda: any(f"127.0.0.1:{second}" in e["message"] for e in events(gateway, "Listening")), 10,
                   "the recovery to be said")
        assert len(events(gateway, "ListenFailed")) == 1, "said once per streak"


def test_bad_second_addresses_are_refused_with_where_and_what(home: Path, tmp_path: Path):
    home.mkdir(parents=True)
    cases = {
        "  ollama: {listen: '11434'}\n": "spec.ollama.listen: '11434' must be host:port, e.g. 127.0.0.1:11434",
        "  ollama: {listen: 127.0.0.1:70000}\n": "spec.ollama.listen: port 70000 is out of range",
        "  listen: 127.0.0.1:99999\n": "spec.listen: port 99999 is out of range",
        "  ollama: {listen: 127.0.0.1:8080}\n": "spec.ollama.listen: 127.0.0.1:8080 collides with spec.listen "
                                                "(127.0.0.1:8080)",
        "  listen: 0.0.0.0:9000\n  ollama: {listen: 127.0.0.1:9000}\n": "collides with spec.listen (0.0.0.0:9000)",
        "  ollama: {port: 11434}\n": "spec.ollama.port: unknown field",
    }
    for lines, expected in cases.items():
        spec = write(tmp_path / "gateway.yaml", "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\n"
                                                "metadata: {name: default}\nspec:\n" + lines)
        result = subprocess.run([ATHANOR, "apply", "-f", str(spec), "--dry-run"], capture_output=True, text=True,
                                env=dict(os.environ), timeout=60)
        assert result.returncode == 1, (lines, result.stdout)
        assert f"{spec}:" in result.stderr and expected in result.stderr, (lines, result.stderr)
    fine = write(tmp_path / "fine.yaml", "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\n"
                                         "metadata: {name: default}\nspec:\n  ollama: {listen: 127.0.0.1:11434}\n")
    result = subprocess.run([ATHANOR, "apply", "-f", str(fine), "--dry-run"], capture_output=True, text=True,
                            env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
