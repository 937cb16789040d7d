"""A swap's own overhead (issue 16, item 6): what athanor does around a runtime's load, made cheap without making it
blind. The preflight reuses a launch only while nothing it came from changed; a runtime's log write brings the next
readiness probe forward, without ever probing back to back; the next start's secret is written when a runtime stops;
a runtime is asked for its slots only when a request it served may have left a conversation worth parking.
Real files, a real store, real llama-server processes and real scripted runtimes writing real logs.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from fixtures.serving import apply_models, model_spec
from fixtures.tier import Tier, until
from fixtures.tiny_models import write_tiny_llama_gguf, write_tiny_mlx_llama

from athanor.controller import readiness
from athanor.controller.controller import Controller
from athanor.controller.log_watch import watch_log
from athanor.controller.parking import MIN_TOKENS
from athanor.controller.preflight import LaunchMemo, prepare_launch
from athanor.controller.readiness import StartAborted, probe_session, wait_ready
from athanor.errors import ModelUnavailable
from athanor.managers.process import ProcessSupervisor
from athanor.runtimes.launch import LaunchSpec, find_runtime
from athanor.store import open_store

# ---------------------------------------------------------------------------------------------- the launch memo


@pytest.fixture
def applied(home: Path, tmp_path: Path) -> Path:
    """A tiny GGUF served by a copy of llama-server (so the test may rebuild it), and a tiny MLX model."""
    home.mkdir(parents=True, exist_ok=True)
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.symlink_to(find_runtime("llama-server"))  # a path of the test's own: replacing it is a "rebuild"
    gguf = write_tiny_llama_gguf(tmp_path / "weights" / "tiny.gguf")
    mlx = write_tiny_mlx_llama(tmp_path / "weights" / "tiny-mlx")
    gateway = ("apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: default}\n"
               f"spec: {{runtimes: {{llama-server: {{path: {str(binary)!r}}}}}}}\n")
    apply_models(tmp_path / "models.yaml", gateway, model_spec("tiny", gguf), model_spec("tiny-mlx", mlx, "mlx-lm"))
    return binary


def _prepared(memo: LaunchMemo, name: str = "tiny") -> tuple[dict, LaunchSpec]:
    store = open_store()
    doc = store.models.load()
    return doc, prepare_launch(doc, doc["models"][name], store.home, memo=memo)


def test_a_launch_is_reused_for_the_same_document_while_its_files_are_unchanged(applied: Path):
    memo = LaunchMemo()
    doc, first = _prepared(memo)
    again = prepare_launch(doc, doc["models"]["tiny"], open_store().home, memo=memo)
    assert again is first, "worked out once for this document"
    _, reread = _prepared(memo)
    assert reread is not first and reread == first, "a new document (every change replaces it) starts afresh"


def test_a_rebuilt_binary_or_replaced_weights_are_seen_at_once(applied: Path, tmp_path: Path):
    memo = LaunchMemo()
    doc, first = _prepared(memo)
    home = open_store().home
    obj = doc["models"]["tiny"]
    applied.unlink()  # the binary rebuilt in place: another file at the same path
    applied.write_bytes(Path(find_runtime("llama-server")).read_bytes())
    applied.chmod(0o755)
    rebuilt = prepare_launch(doc, obj, home, memo=memo)
    assert rebuilt is not first and rebuilt.park_dir != first.park_dir, "the park key follows the binary"

    applied.chmod(0o644)  # no longer executable: the preflight says so, as it did before any memo
    with pytest.raises(ModelUnavailable, match="not an executable file"):
        prepare_launch(doc, obj, home, memo=memo)
    applied.chmod(0o755)

    weights = Path(obj["artifact"]["path"])
    weights.unlink()
    with pytest.raises(ModelUnavailable, match="weights not found on disk"):
        prepare_launch(doc, obj, home, memo=memo)
    write_tiny_llama_gguf(weights)  # downloaded again: new file, new identity
    assert prepare_launch(doc, obj, home, memo=memo).park_dir != rebuilt.park_dir


def test_an_mlx_launch_is_never_kept(applied: Path):
    """An MLX start's identity spans its Python packages, which no stat of its argv shows."""
    memo = LaunchMemo()
    doc, first = _prepared(memo, "tiny-mlx")
    assert prepare_launch(doc, doc["models"]["tiny-mlx"], open_store().home, memo=memo) is not first


# ---------------------------------------------------------------------------------------------- the log watch


def test_a_watched_log_says_when_it_is_written_to(tmp_path: Path):
    log = tmp_path / "runtime.log"
    log.write_text("")
    assert watch_log(tmp_path / "missing.log") is None, "nothing to watch: readiness is polled"

    async def scenario() -> None:
        watch = watch_log(log)
        assert watch is not None
        try:
            assert not watch.written.is_set()
            with log.open("a") as out:
                out.write("listening\n")
            await asyncio.wait_for(watch.written.wait(), 30)
        finally:
            watch.close()

    asyncio.run(scenario())


# A runtime that logs and, when told to, listens: ``LISTEN_AFTER`` seconds after it started (never, when absent).
RUNTIME = textwrap.dedent("""
    import http.server, os, sys, threading, time
    listen_after = float(os.environ.get("LISTEN_AFTER", "inf"))
    log_every = float(os.environ.get("LOG_EVERY", "10"))
    started = time.monotonic()
    while (left := started + listen_after - time.monotonic()) > 0:
        print("loading", flush=True)
        time.sleep(min(log_every, left))

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
    print("listening", flush=True)
    server.serve_forever()
""")


def _started(tmp_path: Path, port: int, **env: str) -> tuple[ProcessSupervisor, object]:
    script = tmp_path / "runtime.py"
    script.write_text(RUNTIME)
    supervisor = ProcessSupervisor(tmp_path / "logs")
    handle = supervisor.start("runtime", [sys.executable, str(script), str(port)], env=env)
    return supervisor, handle


def _launch(port: int) -> LaunchSpec:
    return LaunchSpec("llama-server", [], {}, port, "m", "/health")


def _slow_polls(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Probe on a timer only every ``seconds``, whatever the time waited."""
    monkeypatch.setattr(readiness, "FIRST_DELAY", seconds)
    monkeypatch.setattr(readiness, "RELATIVE_DELAY", 0.0)
    monkeypatch.setattr(readiness, "MAX_DELAY", seconds)


def test_a_runtime_that_logs_its_readiness_is_seen_without_waiting_for_the_next_poll(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fixtures.serving import free_port

    _slow_polls(monkeypatch, 30.0)  # left to the timer, readiness would be seen 30 s late
    port = free_port()
    supervisor, handle = _started(tmp_path, port, LISTEN_AFTER="0.5")

    async def scenario() -> float:
        watch = watch_log(handle.log_path)
        assert watch is not None
        async with probe_session() as session:
            try:
                waited, _ = await wait_ready(session, lambda: _launch(port), timeout=600,
                                             alive=lambda: _alive(supervisor, handle), abort=asyncio.Event(),
                                             written=watch.written)
            finally:
                watch.close()
        return waited

    try:
        assert asyncio.run(scenario()) < 15, "seen when the runtime logged it, not at the next poll"
    finally:
        supervisor.stop(handle, 5)


def test_a_runtime_that_logs_all_along_is_not_probed_back_to_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fixtures.serving import free_port

    _slow_polls(monkeypatch, 0.2)  # a write brings a probe forward at most once per 20 ms (WRITTEN_SHARE)
    port = free_port()
    supervisor, handle = _started(tmp_path, port, LOG_EVERY="0.0005")  # thousands of lines a second, never ready
    probes = 0
    health_status = readiness.health_status

    async def counted(*args: object, **kwargs: object) -> int | None:
        nonlocal probes
        probes += 1
        return await health_status(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(readiness, "health_status", counted)

    async def scenario() -> float:
        watch = watch_log(handle.log_path)
        assert watch is not None
        abort = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, abort.set)  # the length of the run, not a synchronisation
        started = time.monotonic()
        async with probe_session() as session:
            try:
                with pytest.raises(StartAborted):
                    await wait_ready(session, lambda: _launch(port), timeout=600,
                                     alive=lambda: _alive(supervisor, handle), abort=abort, written=watch.written)
            finally:
                watch.close()
        return time.monotonic() - started

    try:
        ran = asyncio.run(scenario())
    finally:
        supervisor.stop(handle, 5)
    by_timer = ran / 0.2
    assert probes > 2 * by_timer + 2, f"its log brought probes forward ({probes} in {ran:.1f} s)"
    assert probes <= ran / 0.02 + by_timer + 5, f"{probes} probes in {ran:.1f} s: probed back to back"


async def _alive(supervisor: ProcessSupervisor, handle: object) -> bool:
    return supervisor.alive(handle)  # type: ignore[arg-type]


def test_a_watch_the_event_loop_refuses_leaves_the_start_to_polling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The kqueue path cannot run here; whatever an event loop raises for a descriptor it will not watch, the start
    polls instead, and nothing is left open."""
    log = tmp_path / "runtime.log"
    log.write_text("")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        opened = len(list(Path("/proc/self/fd").iterdir()))

        def refuse(*args: object) -> None:
            raise ValueError("this loop does not watch that kind of descriptor")

        monkeypatch.setattr(loop, "add_reader", refuse)
        assert watch_log(log) is None
        assert len(list(Path("/proc/self/fd").iterdir())) == opened, "the refused watch's descriptor was closed"

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- parking's question


def test_a_runtime_is_asked_for_its_slots_only_when_a_request_may_have_left_a_conversation(tier: Tier):
    """Parking's ``GET /slots`` is a round trip to the old runtime in the middle of every swap. The gateway saw
    every request the runtime served and the tokens each reported: when none can have left ``MIN_TOKENS`` in a
    slot, there is nothing worth parking and nothing to ask. A request that reported no usage (a client gone
    before the answer) leaves that unknown, and the runtime is asked."""
    answer = tier.gate("answer")
    tier.model("m")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def asked() -> int:
        return tier.log("m").count("request GET /slots")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            async def ask(**extra: object) -> int:
                async with session.post(url + "/v1/chat/completions", json={**chat, **extra}) as resp:
                    await resp.read()
                    return resp.status

            assert await ask() == 200 and await ask(stream=True) == 200  # whole and streamed: 2 tokens each
            assert c.instances["m"].slot_tokens == 2
            await c.stop("m")
            assert asked() == 0, "nothing worth parking: not asked"

            tier.script("m", promptTokens=MIN_TOKENS)
            assert await ask() == 200
            await c.stop("m")
            assert asked() == 1, "a conversation worth parking may be there: asked"

            tier.script("m", answerGate=str(answer))
            held = asyncio.ensure_future(ask())
            await until_logged(tier, "request /v1/chat/completions", 4)
            held.cancel()  # the client goes away: the answer, and its usage, never come
            await asyncio.gather(held, return_exceptions=True)
            answer.open()
            await until_idle(c, "m")
            assert c.instances["m"].slot_tokens is None
            await c.stop("m")
            assert asked() == 2, "not known: asked"

    tier.run(scenario)


async def until_logged(tier: Tier, line: str, count: int) -> None:
    await until(lambda: tier.log("m").count(line) >= count, f"{count} lines {line!r} in the runtime's log")


async def until_idle(controller: Controller, name: str) -> None:
    await asyncio.wait_for(controller.instances[name].until_idle(), 10)
