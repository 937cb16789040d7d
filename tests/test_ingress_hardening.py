"""The ingress when an answer goes wrong or is cut short, in the fast tier (real controller, ingress and scripted
runtimes over loopback): an error after a stream began ends that stream instead of starting a second response,
the model id is rewritten in the ``model`` field only, and every request is counted exactly once, a client that
went away before the end of its answer as 499.

Where the byte stream itself is the point, the client is a raw socket: it sees every byte the gateway sends, and
hangs up exactly when the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from athanor.ingress.proxy import ModelIdRewrite, _Relay
from athanor.ingress.tap import Tap
from athanor.metrics import Metrics
from athanor.managers.process import ProcessHandle, ProcessSupervisor
from athanor.managers.systemd import SystemctlError
from fixtures.tier import Tier, pid_of, supervise_with
from test_ingress import CHAT, body, post, sse_events
from test_operations import scrape

HELD_STREAM_RUNTIME = Path(__file__).parent / "fixtures" / "held_stream_runtime.py"
MESSAGES = "/v1/messages"
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def send_post(port: int, path: str, payload: dict[str, Any]) -> Connection:
    """A POST over a raw socket (``Connection: close``: the gateway closes it after the answer)."""
    data = json.dumps(payload).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes | None, raw: bytes = b"") -> bytes:
    """``raw`` plus what arrives, until ``marker`` is in it or (``None``, or never) the gateway closes."""
    while marker is None or marker not in raw:
        piece = await reader.read(65536)
        if not piece:
            break
        raw += piece
    return raw


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def exchange(port: int, path: str, payload: dict[str, Any], *, hang_up_at: bytes | None = None) -> bytes:
    """One POST over a raw socket; returns every byte the gateway sent, until it closed the connection. With
    ``hang_up_at``, only until those bytes have arrived: then the client hangs up at once, as the openai SDK does
    when it has read ``[DONE]``."""
    reader, writer = await send_post(port, path, payload)
    try:
        return await read_until(reader, hang_up_at)
    finally:
        await hang_up(writer)


def dechunk(raw: bytes) -> tuple[bytes, bytes, bool]:
    """(head, body, whether the chunked body reached its last chunk) of one raw HTTP/1.1 response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    content = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, content, True
        content, rest = content + rest[:size], rest[size + 2:]
    return head, content, False


def request_counts(samples: dict[Any, float], model: str, route: str) -> dict[str, float]:
    """athanor_requests_total of one model and route, by status."""
    return {dict(labels)["status"]: value for (name, labels), value in samples.items()
            if name == "athanor_requests_total" and dict(labels)["model"] == model and dict(labels)["route"] == route}


def _hold_streams(tier: Tier) -> None:
    """Run models on the held-stream runtime (fixtures/held_stream_runtime.py), whose streams wait at gates."""
    held = tier.root / "held-llama-server"
    held.write_text(f'#!/bin/sh\nexec {sys.executable} {HELD_STREAM_RUNTIME} "$@"\n')
    held.chmod(0o755)
    tier.gateway(runtimes={"llama-server": {"path": str(held)}})


# ---------------------------------------------------------------------------------------------- errors mid-stream


class _ManagerFailsOnTheDead(ProcessSupervisor):
    """Asked about a runtime once it has been killed, the service manager fails instead of answering, as systemctl
    does when it times out: a fault injected where no real one can be provoked on demand. The test says when it
    kills the runtime: a killed process can still look alive to waitpid while its other threads exit, and the death
    look then collects its exit code by stopping it, without asking again (under load, about one run in two)."""

    killed = False

    def alive(self, handle: ProcessHandle) -> bool:
        if self.killed:
            raise SystemctlError("systemctl --user show athanor-m.service: Failed to connect to bus: "
                                 "Connection timed out")
        return super().alive(handle)


@pytest.mark.parametrize("route", [CHAT, MESSAGES])
def test_an_error_after_a_stream_began_ends_it_with_an_error_event(tier: Tier, route: str,
                                                                  caplog: pytest.LogCaptureFixture):
    done = tier.gate("done")
    _hold_streams(tier)
    tier.model("m")
    tier.script("m", doneGate=done)  # the first event goes out, then the runtime holds the rest

    async def scenario() -> bytes:
        async with tier.controller() as c, tier.ingress(c):
            supervisor = _ManagerFailsOnTheDead(tier.store.logs_dir)
            supervise_with(c, supervisor)
            await c.start("m")
            reader, writer = await send_post(tier.port, route, body(stream=True, max_tokens=4))
            try:
                raw = await read_until(reader, b'"content"')  # the stream is under way
                # The runtime dies mid-stream; asking the manager whether it did raises.
                supervisor.killed = True
                os.kill(pid_of(c.instances["m"]), signal.SIGKILL)
                return await read_until(reader, None, raw)
            finally:
                await hang_up(writer)

    raw = tier.run(scenario)
    assert raw.count(b"HTTP/1.1 ") == 1, f"a second response inside the stream: {raw!r}"
    head, content, complete = dechunk(raw)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert complete, "the stream ends properly, with its last chunk"
    last = content.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].decode()
    if route == CHAT:
        assert last.startswith("data: ")
        assert json.loads(last.removeprefix("data: "))["error"]["code"] == "internal_error"
    else:
        kind, data = last.split("\n")
        assert kind == "event: error"
        assert json.loads(data.removeprefix("data: "))["type"] == "error"
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any(isinstance(r.exc_info[1], SystemctlError) for r in logged), "the exception is in the gateway's log"


# ---------------------------------------------------------------------------------------------- the model id


def test_the_model_id_is_rewritten_in_the_model_field_only(tier: Tier):
    tier.model("hi", aliases=["greeting"])  # the scripted runtime answers "hi", which is also its served name

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            status, reply, _ = await post(session, url + CHAT, body("greeting"))
            assert status == 200
            assert reply["model"] == "greeting" and reply["choices"][0]["message"]["content"] == "hi"
            async with session.post(url + CHAT, json=body("greeting", stream=True)) as resp:
                assert resp.status == 200
                chunks = [json.loads(e) for e in sse_events(await resp.text()) if e != "[DONE]"]
            assert chunks and all(ch["model"] == "greeting" for ch in chunks)
            assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == "hi"
            status, reply, _ = await post(session, url + CHAT, body("hi"))  # by its own name: nothing to rewrite
            assert reply["model"] == "hi" and reply["choices"][0]["message"]["content"] == "hi"

    tier.run(scenario)


def test_the_model_id_rewrite_changes_model_keys_at_any_depth_and_no_text():
    rewrite = ModelIdRewrite("yes", 'my "yes" model')
    responses_event = b'event: response.created\ndata: {"type":"response.created","response":{"model":"yes"}}\n\n'
    anthropic_event = b'event: message_start\ndata: {"type": "message_start", "message": {"model" : "yes"}}\n\n'
    for event, path in ((responses_event, ("response", "model")), (anthropic_event, ("message", "model"))):
        data = json.loads(rewrite.apply(event).split(b"data: ", 1)[1])
        assert data[path[0]][path[1]] == 'my "yes" model'
    answer = {"model": "yes", "choices": [{"message": {"content": "yes"}}],
              "echo": '{"model": "yes"}', "tool": {"arguments": '{"model":"yes"}'}}
    rewritten = json.loads(rewrite.apply(json.dumps(answer).encode()))
    assert rewritten == {**answer, "model": 'my "yes" model'}
    untouched = b'{"model": "no", "content": "yes-ish"}'
    assert rewrite.apply(untouched) is untouched, "a body without the served name is passed through as it is"


_STREAM = (b'data: {"model":"yes","choices":[{"delta":{"content":"yes, "}}]}\n\n'
           b'data: {"model":"yes","choices":[{"delta":{"content":"\\"usage\\""}}]}\n\n'
           b'data: {"model":"yes","choices":[],"usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}}\n\n'
           b"data: [DONE]\n\n")


class _KeptWrites:
    """What ``_Relay`` needs of a client's exchange: the writes, kept."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write_now(self, data: bytes) -> bool:
        self.written.append(data)
        return True


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(min_value=1, max_value=len(_STREAM) - 1), max_size=12))
def test_a_stream_relayed_in_any_cut_reaches_the_client_as_in_one_piece(cuts: set[int]):
    """However the runtime's stream is cut into chunks, the client gets whole lines, the model id rewritten where it
    is one and nowhere else, the usage counted, and the usage-only event it did not ask for left out."""
    edges = [0, *sorted(cuts), len(_STREAM)]
    tap = Tap(Metrics(), "m", "/v1/chat/completions", arrived=0.0)
    tap.drop_usage = True
    client = _KeptWrites()
    relay = _Relay(client, ModelIdRewrite("yes", "asked"), tap)  # type: ignore[arg-type]
    for start, end in zip(edges, edges[1:]):
        assert relay(_STREAM[start:end])
    assert relay.carry == b""
    assert all(write.endswith(b"\n") for write in client.written)
    assert b"".join(client.written) == (b'data: {"model":"asked","choices":[{"delta":{"content":"yes, "}}]}\n\n'
                                        b'data: {"model":"asked","choices":[{"delta":{"content":"\\"usage\\""}}]}'
                                        b"\n\ndata: [DONE]\n\n")
    assert tap.counts == {b"completion_tokens": 2, b"prompt_tokens": 3}


# ---------------------------------------------------------------------------------------------- counting


def test_a_client_that_hangs_up_at_done_is_counted_once_as_answered(tier: Tier):
    end = tier.gate("end")
    _hold_streams(tier)
    tier.model("m")
    tier.script("m", endGate=end)  # [DONE] goes out, the end of the body waits: the gateway is still at work

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            inst = c.instances["m"]
            raw = await exchange(tier.port, CHAT, body(stream=True), hang_up_at=b"data: [DONE]")
            assert b"data: [DONE]" in raw and not dechunk(raw)[2], "hung up before the end of the body"
            # The request lets go of the runtime in the same step as it is counted: once idle, it is counted.
            await asyncio.wait_for(inst.until_idle(), 10)
            end.open()
            async with session.get(url + "/metrics") as resp:
                samples = scrape(await resp.text())
        assert request_counts(samples, "m", CHAT) == {"200": 1}
        duration = [v for (name, labels), v in samples.items()
                    if name == "athanor_request_duration_seconds_count" and dict(labels)["model"] == "m"]
        assert duration == [1]

    tier.run(scenario)


def test_a_client_that_hangs_up_mid_stream_is_counted_once_as_499(tier: Tier):
    done = tier.gate("done")
    _hold_streams(tier)
    tier.model("m")
    tier.script("m", doneGate=done)  # the first event goes out, [DONE] waits: the answer is under way

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            inst = c.instances["m"]
            raw = await exchange(tier.port, CHAT, body(stream=True), hang_up_at=b'"content"')
            assert b"[DONE]" not in raw
            await asyncio.wait_for(inst.until_idle(), 10)
            done.open()
            async with session.get(url + "/metrics") as resp:
                samples = scrape(await resp.text())
        assert request_counts(samples, "m", CHAT) == {"499": 1}

    tier.run(scenario)
