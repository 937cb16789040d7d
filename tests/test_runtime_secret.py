"""A runtime's own port answers the gateway alone (issue 20, defect 1).

Runtimes listen on predictable loopback ports. Without a secret, any local process could skip the gateway's API
keys there, and any web page could read completions through the browser (llama-server echoed the page's Origin,
mlx_lm.server sent ``*``). Each start now gets a secret in ``$ATHANOR_HOME/run/<model>.key``: llama-server checks
it itself (``--api-key-file``), the MLX servers through ``athanor/runtimes/guarded.py``, and the gateway sends it on
every request and probe. Real runtimes, the real gateway, requests as a hostile page would send them.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import stat
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import psutil
import pytest
from fixtures.serving import Gateway, apply_models, model_spec, start_daemon, wait_until
from fixtures.tiny_models import write_tiny_mlx_qwen2_vl

from athanor.runtimes.launch import GUARD_SCRIPT, Target, find_runtime, launch_spec
from athanor.runtimes.presets import effective_preset

HOSTILE = {"Host": "attacker.example", "Origin": "http://evil.example", "Content-Type": "application/json"}
PREFLIGHT = {"Host": "attacker.example", "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_the_argv_names_the_secret_s_file_where_each_runtime_reads_it():
    key = "/home/u/.athanor/run/m.key"
    llama = launch_spec(Target("m", "llama-server", "/m.gguf"), effective_preset("llama-server", context_length=None,
                        recipe=None, preset={}), 28100, "/bin/llama-server", extra_args=[("--metrics", "spec.args")],
                        secret_file=key)
    assert llama.argv[-3:] == ["--api-key-file", key, "--metrics"], "the model's own args still come last"
    mlx_server = find_runtime("mlx-lm")
    mlx = launch_spec(Target("m", "mlx-lm", "/m"), effective_preset("mlx-lm", context_length=None, recipe=None,
                      preset={}), 28101, mlx_server, secret_file=key)
    assert mlx.argv[1:6] == [GUARD_SCRIPT, "--secret-file", key, "--", mlx_server]
    assert Path(mlx.argv[0]).exists(), "the Python of mlx_lm.server's shebang runs the guard"
    assert dict(zip(mlx.argv, mlx.origins, strict=True))[key] == "athanor: the gateway's secret"
    unguarded = launch_spec(Target("m", "mlx-lm", "/m"), {}, 28101, mlx_server)
    assert unguarded.argv[0] == mlx_server and unguarded.secret_file is None


def _body(model: str) -> bytes:
    return json.dumps({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode()


def _direct(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None,
            ) -> tuple[int, Message, bytes]:
    """A request straight to a runtime's port, bypassing the gateway."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _over_socket(path: str, body: bytes, headers: dict[str, str]) -> int:
    """The status of a POST to /v1/chat/completions on a runtime's Unix socket, bypassing the gateway."""
    connection = http.client.HTTPConnection("localhost", timeout=60)
    connection.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.sock.connect(path)
        connection.request("POST", "/v1/chat/completions", body, headers)
        return connection.getresponse().status
    finally:
        connection.close()


def _secret(gateway: Gateway, name: str) -> str:
    return (gateway.home / "run" / f"{name}.key").read_text().strip()


def _tiny_vl(gateway: Gateway, tmp_path: Path) -> None:
    weights = write_tiny_mlx_qwen2_vl(tmp_path / "weights" / "tiny-vl")
    apply_models(tmp_path / "vl.yaml", model_spec("tiny-vl", weights, "mlx-vlm", "  preset: {maxTokens: 2}\n"))


@pytest.mark.parametrize("model", ["tiny-gguf", "tiny-mlx", "tiny-vl"])
def test_a_runtime_s_port_refuses_whoever_lacks_the_gateway_s_secret(gateway: Gateway, model: str, tmp_path: Path):
    if model == "tiny-vl":
        _tiny_vl(gateway, tmp_path)
    status, answer = gateway.post("/v1/chat/completions", _body(model))
    assert status == 200 and answer["model"] == model, answer  # through the gateway: served as ever
    port = gateway.live(model)["port"]
    served = gateway.recorded()["instances"][model]["servedModel"]  # what the runtime answers to (an MLX path)

    status, headers, text = _direct(port, "POST", "/v1/chat/completions", HOSTILE, _body(served))
    assert status == 401, text
    assert "choices" not in json.loads(text)
    assert headers.get("Access-Control-Allow-Origin") is None, "a foreign page may not even read the refusal"
    # A browser asks first for a request with these headers; no answer may let the page go on.
    status, headers, _ = _direct(port, "OPTIONS", "/v1/chat/completions", PREFLIGHT)
    assert headers.get("Access-Control-Allow-Origin") is None, (status, dict(headers))
    # A local process with the wrong key, either way a runtime accepts one.
    for wrong in ({"Authorization": "Bearer not-the-secret"}, {"X-Api-Key": "not-the-secret"}):
        status, _, _ = _direct(port, "POST", "/v1/chat/completions", {"Content-Type": "application/json", **wrong},
                               _body(served))
        assert status == 401, wrong

    secret = _secret(gateway, model)
    status, headers, text = _direct(port, "POST", "/v1/chat/completions",
                                    {**HOSTILE, "Authorization": f"Bearer {secret}"}, _body(served))
    assert status == 200 and "choices" in json.loads(text), "the secret is what it takes"
    assert headers.get("Access-Control-Allow-Origin") is None
    if model == "tiny-gguf":  # llama-server's own health route stays open (nothing in it but "ok")
        assert _direct(port, "GET", "/health", {})[0] == 200

    status, answer = gateway.post("/v1/chat/completions", _body(model),
                                  {"Authorization": "Bearer the-client-s-own", "X-Api-Key": "the-client-s-own"})
    assert status == 200, "the client's credentials are not forwarded (they would displace the gateway's)"


def test_the_secret_is_private_per_start_and_never_shown(gateway: Gateway):
    status, _ = gateway.post("/v1/chat/completions", _body("tiny-mlx"))
    assert status == 200
    key = gateway.home / "run" / "tiny-mlx.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    secret = key.read_text().strip()
    assert len(secret) >= 40
    cmdline = psutil.Process(gateway.runtime_pid("tiny-mlx")).cmdline()
    assert str(key) in cmdline and secret not in " ".join(cmdline), "ps shows the file, never the secret"
    described = gateway.athanor("describe", "model", "tiny-mlx").stdout
    assert str(key) in described and secret not in described
    gateway.recorded()
    assert secret not in (gateway.home / "state.json").read_text()

    assert gateway.athanor("stop", "tiny-mlx").returncode == 0
    status, _ = gateway.post("/v1/chat/completions", _body("tiny-mlx"))
    assert status == 200
    assert key.read_text().strip() != secret, "every start gets a fresh secret"


@pytest.mark.parametrize("model", ["tiny-gguf", "tiny-mlx"])
def test_a_gateway_killed_and_restarted_talks_to_the_runtime_it_re_attached(gateway: Gateway, model: str):
    status, _ = gateway.post("/v1/chat/completions", _body(model))
    assert status == 200
    pid, secret = gateway.runtime_pid(model), _secret(gateway, model)
    gateway.recorded()
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    gateway.proc = start_daemon(gateway.home, int(gateway.url.rsplit(":", 1)[1]))
    status, answer = gateway.post("/v1/chat/completions", _body(model))
    assert status == 200 and answer["model"] == model, answer
    assert gateway.runtime_pid(model) == pid, "re-attached, not restarted"
    assert _secret(gateway, model) == secret, "the runtime's secret, read back from its file"
    record = gateway.recorded()["instances"][model]
    status, _, _ = _direct(gateway.live(model)["port"], "POST", "/v1/chat/completions", HOSTILE,
                           _body(record["servedModel"]))
    assert status == 401
    if model == "tiny-gguf":  # llama-server's socket, where the gateway's requests go: the secret guards it too
        assert _over_socket(record["socket"], _body(record["servedModel"]), HOSTILE) == 401
        connections = [c for c in psutil.Process(pid).net_connections("unix") if c.laddr == record["socket"]]
        assert len(connections) >= 2, "the new gateway reaches it on its socket (besides the listening one)"


def test_a_runtime_whose_secret_is_gone_is_replaced_rather_than_adopted(gateway: Gateway):
    """llama-server's /health needs no key, so it looks healthy; but a gateway that cannot read the secret could
    only forward 401s to it. It is stopped like any runtime it cannot use, and the next request starts a new one."""
    status, _ = gateway.post("/v1/chat/completions", _body("tiny-gguf"))
    assert status == 200
    pid = gateway.runtime_pid("tiny-gguf")
    gateway.recorded()
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    (gateway.home / "run" / "tiny-gguf.key").unlink()
    gateway.proc = start_daemon(gateway.home, int(gateway.url.rsplit(":", 1)[1]))
    status, answer = gateway.post("/v1/chat/completions", _body("tiny-gguf"))
    assert status == 200 and answer["model"] == "tiny-gguf", answer
    assert gateway.runtime_pid("tiny-gguf") != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_next_start_s_secret_is_written_when_its_runtime_stops(gateway: Gateway):
    """Replacing the file is a fraction of a millisecond of a swap's critical path (on ext4 a rename over a file
    starts its writeback), so the next start's secret is written once the runtime has stopped; that start uses it,
    and the runtime it starts accepts it."""
    status, _ = gateway.post("/v1/chat/completions", _body("tiny-gguf"))
    assert status == 200
    first = _secret(gateway, "tiny-gguf")
    assert gateway.athanor("stop", "tiny-gguf").returncode == 0
    wait_until(lambda: _secret(gateway, "tiny-gguf") != first, 30, "the next start's secret")
    spare = _secret(gateway, "tiny-gguf")
    status, _ = gateway.post("/v1/chat/completions", _body("tiny-gguf"))
    assert status == 200
    assert _secret(gateway, "tiny-gguf") == spare, "the start used the secret written for it"
    served = gateway.recorded()["instances"]["tiny-gguf"]["servedModel"]
    headers = {"Authorization": f"Bearer {spare}", "Content-Type": "application/json"}
    status, _, _ = _direct(gateway.live("tiny-gguf")["port"], "POST", "/v1/chat/completions", headers, _body(served))
    assert status == 200, "the runtime was started with it"
