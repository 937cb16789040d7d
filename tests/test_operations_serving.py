"""Operations against a real daemon and real runtimes: metrics that match what the openai SDK saw, every route
llama-server serves passing through, models appearing in the HF cache while the daemon runs, a new listen
address taken without dropping a stream, events and conditions through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest
from conftest import ATHANOR
from fixtures.tiny_models import write_tiny_llama_gguf
from prometheus_client.parser import text_string_to_metric_families
from fixtures.serving import (
    Gateway,
    chat,
    free_port,
    long_gguf,
    wait_until,
    write_gateway,
)


def scrape(gateway: Gateway) -> dict:
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def tokens(samples: dict, model: str, kind: str) -> float:
    return samples.get(("athanor_tokens_total", (("kind", kind), ("model", model))), 0.0)


def requests(samples: dict, model: str, route: str, status: str) -> float:
    return samples.get(("athanor_requests_total", (("model", model), ("route", route), ("status", status))), 0.0)


@pytest.mark.parametrize("model", ["tiny-gguf", "tiny-mlx"])
def test_metrics_match_what_the_openai_sdk_saw(gateway, model):
    prompt = completion = 0
    for _ in range(3):
        reply = chat(gateway.client, model)
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
    # A stream whose client did not ask for usage: the gateway asks, counts, and drops the usage-only chunk.
    chunks = list(chat(gateway.client, model, stream=True))
    assert chunks and all(c.usage is None for c in chunks), "the client gets no usage it did not ask for"
    assert all(c.choices for c in chunks), "no usage-only chunk reaches the client"
    # A stream whose client asked for it gets it, once.
    asked = list(gateway.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    usage = [c.usage for c in asked if c.usage is not None]
    assert len(usage) == 1
    prompt += usage[0].prompt_tokens
    completion += usage[0].completion_tokens
    samples = scrape(gateway)
    assert requests(samples, model, "/v1/chat/completions", "200") == 5
    streamed_prompt = tokens(samples, model, "prompt") - prompt
    streamed_completion = tokens(samples, model, "completion") - completion
    # The stream that did not ask is counted too: exactly one more prompt of the same size, and its tokens.
    assert streamed_prompt == usage[0].prompt_tokens
    assert 1 <= streamed_completion <= 4
    assert samples[("athanor_time_to_first_token_seconds_count", (("model", model),))] == 2
    assert samples[("athanor_load_seconds_count", (("model", model),))] == 1
    assert samples[("athanor_model_phase", (("model", model), ("phase", "Ready")))] == 1


def test_every_llama_server_route_passes_through(gateway):
    """Chat, completions, the Responses API and Anthropic's Messages API (what agent clients use), each answered
    by the real llama-server through the gateway."""
    client = gateway.client
    assert client.completions.create(model="tiny-gguf", prompt="Hello", max_tokens=3).model == "tiny-gguf"
    response = client.responses.create(model="tiny-gguf", input="Hello", max_output_tokens=3)
    assert response.status == "completed" and response.usage.output_tokens >= 1
    status, reply = gateway.post("/v1/messages", json.dumps({
        "model": "tiny-gguf", "max_tokens": 3, "messages": [{"role": "user", "content": "Hello"}]}).encode(),
        {"anthropic-version": "2023-06-01"})
    assert status == 200 and reply["type"] == "message" and reply["usage"]["output_tokens"] >= 1
    request = urllib.request.Request(gateway.url + "/v1/messages", method="POST", data=json.dumps({
        "model": "tiny-gguf", "max_tokens": 3, "stream": True, "temperature": 0,  # greedy: a random model's
        # sampled first token may be a partial UTF-8 character, and llama-server then skips message_start
        "messages": [{"role": "user", "content": "Hello"}]}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        text = resp.read().decode()
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop", text
    # Embeddings and rerank from a chat model: the gateway says why (test_runtime_coverage.py serves real ones).
    status, reply = gateway.post("/v1/rerank", json.dumps({"model": "tiny-gguf", "query": "a",
                                                           "documents": ["b"]}).encode())
    assert status == 400 and "needs a rerank model" in reply["error"]["message"]
    status, reply = gateway.post("/v1/embeddings", json.dumps({"model": "tiny-gguf", "input": "a"}).encode())
    assert status == 400 and "needs an embedding model" in reply["error"]["message"]
    status, reply = gateway.post("/v1/messages/count_tokens", json.dumps({
        "model": "tiny-gguf", "messages": [{"role": "user", "content": "Hello"}]}).encode())
    assert status == 200 and reply["input_tokens"] > 0
    samples = scrape(gateway)
    for route in ("/v1/completions", "/v1/responses", "/v1/messages"):
        assert requests(samples, "tiny-gguf", route, "200") >= 1
    assert tokens(samples, "tiny-gguf", "completion") >= 3


def test_a_route_the_runtime_lacks_is_refused_in_the_callers_format(gateway):
    status, reply = gateway.post("/v1/messages", json.dumps({
        "model": "tiny-mlx", "max_tokens": 3, "messages": [{"role": "user", "content": "Hello"}]}).encode())
    assert status == 404
    assert reply["type"] == "error" and reply["error"]["type"] == "not_found_error"
    assert "mlx-lm" in reply["error"]["message"] and "/v1/messages" in reply["error"]["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client.responses.create(model="tiny-mlx", input="Hello")
    assert caught.value.body["code"] == "unsupported_route"
    assert gateway.runtime_pid("tiny-mlx") is None, "a request it cannot serve never starts it"


def test_a_model_copied_into_the_hf_cache_is_served_without_a_restart(gateway, tmp_path):
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = cache / "models--acme--late-GGUF"
    snapshot = repo / "snapshots" / ("c" * 40)
    blob = repo / "blobs" / ("d" * 64)
    weights = write_tiny_llama_gguf(tmp_path / "late.gguf", seed=5)
    daemon = gateway.proc.pid
    # As huggingface_hub writes it: the blob first (under a partial name), then the ref and the snapshot link.
    blob.parent.mkdir(parents=True)
    shutil.copy(weights, blob.with_name(blob.name + ".incomplete"))
    os.replace(blob.with_name(blob.name + ".incomplete"), blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "late-Q4_K_M.gguf").symlink_to(os.path.relpath(blob, snapshot))

    def listed() -> bool:
        return any(m.id.startswith("acme") or "late" in m.id for m in gateway.client.models.list().data)

    wait_until(listed, 30, "the cache watcher to register the model")
    name = next(m.id for m in gateway.client.models.list().data if "late" in m.id)
    assert chat(gateway.client, name).model == name
    assert gateway.proc.pid == daemon and gateway.proc.poll() is None
    # Deleted from the cache: marked missing, not dropped with its settings.
    assert gateway.athanor("preset", "set", name, "ctxSize=128").returncode == 0
    gateway.athanor("stop", name)
    shutil.rmtree(repo)
    wait_until(lambda: "NotFound" in gateway.athanor("get", "models", name).stdout, 30, "the model to be missing")
    described = gateway.athanor("describe", "model", name).stdout
    assert "ctxSize" in described and "128" in described, "its user settings survive"


def test_a_new_listen_address_is_taken_without_dropping_a_stream(home, models, tmp_path):
    first, second = free_port(), free_port()
    write_gateway(tmp_path, f"  listen: 127.0.0.1:{first}\n")
    env = dict(os.environ)
    proc = subprocess.Popen([ATHANOR, "serve"], env=env, stdout=open(home / "daemon-test.log", "ab"),
                            stderr=subprocess.STDOUT)
    gateway = Gateway(f"http://127.0.0.1:{first}", home, proc, env)
    try:
        wait_until(lambda: _answers(gateway.url), 60, "the gateway to listen")
        model = long_gguf(tmp_path)
        stream = gateway.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                        stream=True, max_tokens=400,
                                                        extra_body={"ignore_eos": True})  # a random model may stop
        got: list[str] = []
        first_chunk = threading.Event()

        finish: list[object] = []

        def read() -> None:
            try:
                for chunk in stream:
                    got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish.append(chunk.choices[0].finish_reason)
                    first_chunk.set()
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                finish.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        assert first_chunk.wait(60)
        write_gateway(tmp_path, f"  listen: 127.0.0.1:{second}\n")
        wait_until(lambda: _answers(f"http://127.0.0.1:{second}"), 30, "the new address to answer")
        wait_until(lambda: not _answers(gateway.url), 30, "the old address to close")
        reader.join(120)
        assert not reader.is_alive() and finish == ["length"], "the stream under way finished on the old connection"
        moved = Gateway(f"http://127.0.0.1:{second}", home, proc, env)
        assert chat(moved.client, "tiny-gguf").model == "tiny-gguf"
        assert json.loads((home / "state.json").read_text())["daemon"]["listen"] == f"127.0.0.1:{second}"
        events = moved.athanor("get", "events").stdout
        assert "Listening" in events and f"127.0.0.1:{second}" in events
    finally:
        gateway.athanor("down")
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return True
    except OSError:
        return False


def test_events_watch_and_conditions_through_the_cli(gateway):
    watcher = subprocess.Popen([ATHANOR, "get", "models", "tiny-gguf", "-w"], env=gateway.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        header = watcher.stdout.readline()
        assert header.split()[:3] == ["NAME", "RUNTIME", "STATUS"]
        watcher.stdout.readline()  # the model's row as it is now
        assert gateway.athanor("start", "tiny-gguf").returncode == 0
        rows = [watcher.stdout.readline().split() for _ in range(2)]
        assert [r[:3] for r in rows] == [["tiny-gguf", "llama-server", "Starting"],
                                         ["tiny-gguf", "llama-server", "Ready"]]
    finally:
        watcher.terminate()
        watcher.wait(10)
    gateway.recorded()
    events = gateway.athanor("get", "events", "tiny-gguf")
    assert events.returncode == 0
    lines = events.stdout.splitlines()
    assert lines[0].split()[:4] == ["LAST", "SEEN", "TYPE", "REASON"]
    assert any(" Ready " in line and "model/tiny-gguf" in line for line in lines)
    described = gateway.athanor("describe", "model", "tiny-gguf").stdout
    conditions = described.split("Conditions:")[1].split("Events:")[0]
    for kind, status in (("Available", "True"), ("Ready", "True"), ("Progressing", "False"), ("Failed", "False")):
        assert any(line.split()[:2] == [kind, status] for line in conditions.splitlines()), conditions
    assert gateway.athanor("wait", "model", "tiny-gguf", "--for", "condition=Failed=False",
                           "--timeout", "5s").returncode == 0
    view = json.loads(gateway.athanor("get", "models", "tiny-gguf", "-o", "json").stdout)
    assert view["status"]["observedGeneration"] == view["metadata"]["generation"]
    with urllib.request.urlopen(gateway.url + "/athanor/v1/models/tiny-gguf", timeout=10) as resp:
        live = json.loads(resp.read())
    assert live["status"]["phase"] == "Ready"
    with urllib.request.urlopen(gateway.url + "/athanor/v1/models/tiny-gguf/logs?lines=5", timeout=10) as resp:
        assert len(resp.read().decode().splitlines()) == 5


def test_top_shows_each_model_s_requests_and_tokens(gateway):
    replies = [chat(gateway.client, "tiny-gguf") for _ in range(2)]
    result = gateway.athanor("top", "--once", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line.split() for line in lines if line.startswith("MODEL"))
    row = next(line.split() for line in lines if line.startswith("tiny-gguf"))
    assert row[header.index("PHASE")] == "Ready"
    assert row[header.index("REQUESTS")] == "2" and row[header.index("ERRORS")] == "0"
    assert row[header.index("COMPLETION")] == str(sum(r.usage.completion_tokens for r in replies))
    assert row[header.index("LOADS")] == "1"


def test_privacy_quiets_the_runtime_logs(gateway, tmp_path):
    chat(gateway.client, "tiny-gguf")
    log = gateway.home / "logs" / "tiny-gguf.log"
    # llama-server writes a request's timings just after its answer: wait for them (bounded), do not race them
    wait_until(lambda: "prompt eval time" in log.read_text(), 30, "llama-server's per-request line (its default)")
    write_gateway(tmp_path, gateway.base_spec + "  privacy: {runtimeLogs: errors}\n")
    old = gateway.runtime_pid("tiny-gguf")
    wait_until(lambda: gateway.runtime_pid("tiny-gguf") not in (old, None) and gateway.phase("tiny-gguf") == "Ready",
               30, "the runtime to restart with its new flags")  # what it runs changed: it reloads by itself
    assert "--log-verbosity 1" in " ".join(psutil.Process(gateway.runtime_pid("tiny-gguf")).cmdline())
    size = log.stat().st_size
    for model in ("tiny-gguf", "tiny-mlx"):
        assert chat(gateway.client, model).model == model
    assert "prompt eval time" not in log.read_text()[size:]
    assert "--log-level ERROR" in " ".join(psutil.Process(gateway.runtime_pid("tiny-mlx")).cmdline())
