"""Ollama's ``POST /api/pull`` (athanor/ollama/pull.py) driven by the real ``ollama`` client against a real aiohttp
server on loopback with just that route, pulling from the fake hub (tests/fixtures/fake_hub.py) with the real
huggingface_hub client into the test's HF cache, registered in the test's store by the real discovery."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ollama
import pytest
from aiohttp import web
from fixtures.fake_hub import FakeHub, HeldFile, HubFile, HubRepo, tiny_gguf

from athanor.ollama import pull
from athanor.store import Store

MiB = 2**20
TINY = "athanor-test/Tiny-Llama-GGUF"
HUGE = "athanor-test/Huge-GGUF"
PROJECTOR = "mmproj-Tiny-Llama-F16.gguf"
TIMEOUT = 60.0
THREAD = "athanor-ollama-pull"  # the name the pull's threads start with


@dataclass
class PullServer:
    url: str
    handled: threading.Event  # set when a pull handler returned (cleared by the test that waits for it)

    def client(self) -> ollama.Client:
        return ollama.Client(host=self.url, timeout=TIMEOUT)

    def post(self, body: bytes) -> tuple[int, str, bytes]:
        """A raw POST /api/pull: (status, Content-Type, body)."""
        request = urllib.request.Request(f"{self.url}/api/pull", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read()


def pull_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD)]


def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling interval with a deadline


@pytest.fixture
def server(fake_hub: FakeHub, store: Store) -> Iterator[PullServer]:
    """An aiohttp server with the one route, on its own loop in a thread (the ollama client blocks); stopped after
    the test, and no pull thread may outlive it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-ollama-pull-server", daemon=True)
    thread.start()
    handled = threading.Event()

    async def route(request: web.Request) -> web.StreamResponse:
        try:
            return await pull.handle(request, store)
        finally:
            handled.set()

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/api/pull", route)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
    host, port = runner.addresses[0][:2]
    try:
        yield PullServer(f"http://{host}:{port}", handled)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
        until(lambda: not pull_threads(), "the pull threads to end")


def downloads(hub: FakeHub, repo: str) -> list[str]:
    """The files of `repo` downloaded, in order (the fit check's read of a GGUF head is not one)."""
    return [r.path.split("/", 5)[-1] for r in hub.requests_to(f"/{repo}/resolve/", "GET")
            if r.range is None or not r.range.startswith("bytes=0-")]


def registered(store: Store) -> dict[str, dict[str, Any]]:
    """The models in the store, by name: their sources."""
    return {name: obj["spec"]["source"] for name, obj in store.models.load()["models"].items()}


def by_digest(parts: list[Any]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for part in parts:
        if part.digest:
            found.setdefault(part.digest, []).append(part)
    return found


def in_order(statuses: list[str], wanted: list[str]) -> bool:
    """`wanted` appear in `statuses` in this order (other lines may come between)."""
    rest = iter(statuses)
    return all(any(s == w for s in rest) for w in wanted)


# ---------------------------------------------------------------------------------------------- success


def test_a_streamed_pull_reports_each_file_as_ollama_does_and_registers_the_model(fake_hub, store, server):
    parts = list(server.client().pull(f"hf.co/{TINY}", stream=True))

    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    assert in_order(statuses, ["pulling manifest", "verifying sha256 digest", "writing manifest",
                               "registered as tiny-llama-q4-k-m", "success"])
    # One digest per file, in the order they were fetched (the projector first, the weights discovery keys on
    # last); completed rises from 0 to the file's size, never past its total.
    files = fake_hub.repos[TINY].files
    expected = {f"sha256:{files[name].sha256}": files[name].size for name in (PROJECTOR, "Tiny-Llama-Q4_K_M.gguf")}
    progress = by_digest(parts)
    assert list(progress) == list(expected)
    for digest, updates in progress.items():
        completed = [u.completed for u in updates]
        assert {u.total for u in updates} == {expected[digest]}
        assert completed[0] == 0 and completed[-1] == expected[digest]
        assert completed == sorted(completed)
        assert {u.status for u in updates} == {f"pulling {digest[len('sha256:'):][:12]}"}
    digests_at = [i for i, p in enumerate(parts) if p.digest]
    assert statuses.index("verifying sha256 digest") > max(digests_at)

    assert downloads(fake_hub, TINY) == [PROJECTOR, "Tiny-Llama-Q4_K_M.gguf"]
    assert registered(store) == {"tiny-llama-q4-k-m": {"hf": {"repo": TINY, "file": "Tiny-Llama-Q4_K_M.gguf"}}}

    # Pulled again, on the wire: NDJSON, one object per line, no blank line; every file complete at once, nothing
    # downloaded, the same model.
    fake_hub.clear_log()
    status, content_type, body = server.post(json.dumps({"model": f"{TINY}:latest"}).encode())
    assert (status, content_type) == (200, "application/x-ndjson")
    assert body.endswith(b"\n")
    lines = [json.loads(line) for line in body.decode().split("\n")[:-1]]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert {line["digest"]: (line["completed"], line["total"]) for line in lines if "digest" in line} == {
        digest: (size, size) for digest, size in expected.items()}
    assert downloads(fake_hub, TINY) == []
    assert list(registered(store)) == ["tiny-llama-q4-k-m"]


def test_a_pull_without_streaming_answers_one_success_object(fake_hub, store, server):
    answer = server.client().pull("mlx-community/Tiny-Llama-4bit", stream=False)

    assert (answer.status, answer.digest, answer.total, answer.completed) == ("success", None, None, None)
    assert registered(store) == {"tiny-llama-4bit": {"hf": {"repo": "mlx-community/Tiny-Llama-4bit"}}}
    assert downloads(fake_hub, "mlx-community/Tiny-Llama-4bit")[-1] == "config.json"

    status, content_type, body = server.post(b'{"model": "mlx-community/Tiny-Llama-4bit", "stream": false}')
    assert (status, content_type, json.loads(body)) == (200, "application/json; charset=utf-8",
                                                        {"status": "success"})


def test_a_quant_tag_picks_that_gguf_with_the_projector(fake_hub, store, server):
    parts = list(server.client().pull(f"huggingface.co/{TINY}:q8_0", stream=True))

    assert parts[-1].status == "success"
    assert downloads(fake_hub, TINY) == [PROJECTOR, "Tiny-Llama-Q8_0.gguf"]
    assert registered(store) == {"tiny-llama-q8-0": {"hf": {"repo": TINY, "file": "Tiny-Llama-Q8_0.gguf"}}}

    with pytest.raises(ollama.ResponseError) as refused:
        server.client().pull(f"hf.co/{TINY}:Q3_K_L", stream=False)
    assert refused.value.status_code == 404
    assert refused.value.error == f"{TINY} has no Q3_K_L quantization; it has Q4_K_M, Q5_K_M, Q8_0, Q2_K"

    with pytest.raises(ollama.ResponseError) as refused:
        list(server.client().pull("hf.co/mlx-community/Tiny-Llama-4bit:Q4_K_M", stream=True))
    assert refused.value.status_code == 404
    assert refused.value.error.startswith("mlx-community/Tiny-Llama-4bit has no GGUF weights, and a tag (:Q4_K_M) "
                                          "picks a GGUF quantization")


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("stream", [True, False])
def test_a_name_that_is_not_a_hub_repo_says_athanor_pulls_from_hugging_face(fake_hub, store, server, stream):
    for name in ("llama3", "qwen3:8b", "registry.ollama.ai/library/llama3:latest"):
        with pytest.raises(ollama.ResponseError) as refused:
            answer = server.client().pull(name, stream=stream)
            if stream:
                list(answer)
        assert refused.value.status_code == 400, name
        assert "athanor pulls models from Hugging Face" in refused.value.error
        assert "hf.co/ORG/REPO[:QUANT]" in refused.value.error
    assert fake_hub.requests == []
    assert registered(store) == {}


def test_bad_bodies_get_ollamas_error_shape(fake_hub, store, server):
    cases = {
        b"not json": "the body is not JSON",
        b"[]": "the body must be a JSON object",
        b"{}": "'model' is required",
        b'{"model": "a/b", "stream": "yes"}': "'stream' must be true or false",
        b'{"name": "llama3"}': "'llama3' is not a Hugging Face repo",  # older clients send `name`
    }
    for body, message in cases.items():
        status, content_type, answer = server.post(body)
        assert (status, content_type) == (400, "application/json; charset=utf-8"), body
        assert list(json.loads(answer)) == ["error"] and json.loads(answer)["error"].startswith(message), answer
    assert fake_hub.requests == []


@pytest.mark.parametrize("stream", [True, False])
def test_an_unknown_repo_is_a_404(fake_hub, store, server, stream):
    with pytest.raises(ollama.ResponseError) as refused:
        answer = server.client().pull("hf.co/nobody/nothing", stream=stream)
        if stream:
            list(answer)
    assert refused.value.status_code == 404
    assert refused.value.error.startswith("no model repo nobody/nothing on the Hub")


def test_a_model_that_cannot_fit_is_refused_before_any_download(fake_hub, store, server):
    from athanor.fit import headroom, machine_memory

    memory = machine_memory()
    if memory.total - headroom(memory.total) >= 200 * 10**9:
        pytest.skip("this machine could hold the 200 GB model")
    with pytest.raises(ollama.ResponseError) as refused:
        list(server.client().pull(f"hf.co/{HUGE}", stream=True))
    assert refused.value.status_code == 400
    assert f"{HUGE} Q4_K_M (Huge-Q4_K_M.gguf) cannot fit this machine" in refused.value.error
    assert fake_hub.requests_to(f"/{HUGE}/resolve/") == []
    assert registered(store) == {}


def test_a_failure_after_the_stream_started_is_its_last_line(fake_hub, store, server):
    # A gated repo is listed openly; its files are refused (401) only when the download asks for them.
    gated = "hf.co/athanor-gated/Gated-Llama-GGUF"
    seen: list[str] = []
    with pytest.raises(ollama.ResponseError) as failed:
        for part in server.client().pull(gated, stream=True):
            seen.append(part.status)
    assert seen[0] == "pulling manifest"
    assert failed.value.error.startswith("athanor-gated/Gated-Llama-GGUF is gated: accept its terms")

    with pytest.raises(ollama.ResponseError) as failed:
        server.client().pull(gated, stream=False)
    assert failed.value.status_code == 502
    assert failed.value.error.startswith("athanor-gated/Gated-Llama-GGUF is gated")
    assert registered(store) == {}


def test_a_file_whose_sha256_is_not_the_listed_one_is_removed_and_not_registered(fake_hub, store, server, tmp_path):
    # The fake hub lists a padded file (a real GGUF, then zeros) under a sha256 that is not its content's: for the
    # pull, a file that arrived other than the Hub lists it. It would load; the check keeps it out.
    repo, name = "t/Mismatch-GGUF", "Mismatch-Q4_K_M.gguf"
    fake_hub.add(HubRepo(repo, {name: HubFile(tiny_gguf(15), size=len(tiny_gguf(15)) + 4096)}, library_name="gguf"))
    seen: list[str] = []
    with pytest.raises(ollama.ResponseError) as failed:
        for part in server.client().pull(f"hf.co/{repo}", stream=True):
            seen.append(part.status)
    assert seen[-1] == "verifying sha256 digest"
    listed = fake_hub.repos[repo].files[name].sha256
    assert failed.value.error.startswith(f"{name} of {repo} arrived with sha256 ")
    assert failed.value.error.endswith(f"not the Hub's {listed[:12]}: it was removed from the cache; pull again")
    assert not list((tmp_path / "hf" / "hub").rglob(name)) and not list((tmp_path / "hf" / "hub").rglob(listed))
    assert registered(store) == {}

    with pytest.raises(ollama.ResponseError) as failed:
        server.client().pull(f"hf.co/{repo}", stream=False)  # fetched again, and refused again
    assert failed.value.status_code == 502 and "arrived with sha256" in failed.value.error
    assert downloads(fake_hub, repo) == [name, name]


# ---------------------------------------------------------------------------------------------- the client leaves


def test_a_client_that_leaves_stops_the_download_and_nothing_is_registered(fake_hub, store, server, tmp_path):
    repo, name = "t/Held-GGUF", "Held-Q4_K_M.gguf"
    held = HeldFile(tiny_gguf(15), size=8 * MiB, hold_s=TIMEOUT)
    fake_hub.add(HubRepo(repo, {name: held}, library_name="gguf"))
    server.handled.clear()
    try:
        stream = server.client().pull(f"hf.co/{repo}", stream=True)
        assert next(stream).status == "pulling manifest"
        assert held.started.wait(TIMEOUT), "the download never started"
        stream.close()  # the client goes away in the middle of the file
        assert server.handled.wait(TIMEOUT), "the handler never noticed the client left"
    finally:
        held.release.set()
    # The next chunk after the handler ended stops the download: the thread ends, huggingface_hub removes the file
    # it was writing, and discovery has nothing to register.
    until(lambda: not pull_threads(), "the pull thread to stop")
    cache = tmp_path / "hf" / "hub"
    assert list(cache.rglob("*.incomplete")) == []
    assert not list(cache.rglob(name))
    assert registered(store) == {}


# ---------------------------------------------------------------------------------------------- through the gateway


def test_a_pull_through_the_gateway_is_served_at_once(fake_hub, gateway):
    repo = "t/Gateway-Tiny-GGUF"
    fake_hub.add(HubRepo(repo, {"Gateway-Tiny-Q4_K_M.gguf": HubFile(tiny_gguf(15))}, library_name="gguf"))
    client = ollama.Client(host=gateway.url, timeout=TIMEOUT)

    parts = list(client.pull(f"hf.co/{repo}", stream=True))

    assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
    size = fake_hub.repos[repo].files["Gateway-Tiny-Q4_K_M.gguf"].size
    assert [(p.completed, p.total) for p in parts if p.digest][-1] == (size, size)
    assert "gateway-tiny-q4-k-m" in {m.id for m in gateway.client.models.list()}  # registered, published
    for name in (f"hf.co/{repo}", f"hf.co/{repo}:q4_k_m", f"{repo}:latest"):  # used by the name it was pulled as
        answer = client.generate(model=name, prompt="hi", options={"num_predict": 2})
        assert answer.done and answer.model == name
    with pytest.raises(ollama.ResponseError) as missing:
        client.generate(model=f"hf.co/{repo}:Q8_0", prompt="hi")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as refused:
        client.pull("llama3")
    assert refused.value.status_code == 400 and "athanor pulls models from Hugging Face" in refused.value.error
