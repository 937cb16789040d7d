"""The ingress in-process in front of the real controller and scripted runtimes, over real HTTP on loopback.

What a client sees: errors as OpenAI objects with the right status, retries when a runtime vanished, the queue
limit decided before any header, bounded connections to a runtime, and the defences against web pages.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest

from athanor.controller.instance import Phase
from athanor.ingress.app import _created
from conftest import lan_address
from fixtures.tier import Tier, pid_of, until

CHAT = "/v1/chat/completions"


def body(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def post(session: aiohttp.ClientSession, url: str, payload: Any, **kwargs: Any) -> tuple[int, Any, Any]:
    async with session.post(url, json=payload, **kwargs) as resp:
        text = await resp.text()
        try:
            data = json.loads(text)
        except ValueError:
            data = text
        return resp.status, data, resp.headers


def sse_events(text: str) -> list[Any]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------- failures


def test_a_kill_with_requests_in_flight_costs_one_failure_and_the_next_request_restarts(tier: Tier):
    answer = tier.gate("answer")
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            status, _, _ = await post(session, url + CHAT, body())
            assert status == 200
            tier.script("m", answerGate=answer)
            await c.restart("m")  # the next runtime holds its answers
            inst = c.instances["m"]
            calls = [asyncio.ensure_future(post(session, url + CHAT, body())) for _ in range(4)]
            await until(lambda: tier.log("m").count("request /v1/chat") >= 5, "4 requests in flight")
            os.kill(pid_of(inst), signal.SIGKILL)
            results = await asyncio.gather(*calls)
            assert [(s, d["error"]["code"]) for s, d, _ in results] == [(502, "upstream_failed")] * 4
            assert len(inst.failures) == 1 and inst.last_failure["reason"] == "Crashed"
            answer.open()
            status, reply, _ = await post(session, url + CHAT, body())
            assert status == 200 and reply["model"] == "m" and inst.phase is Phase.READY

    tier.run(scenario)


def test_a_stream_that_waited_for_a_load_is_retried_when_the_runtime_is_gone(tier: Tier):
    tier.model("m")
    tier.script("m", exitAfterReady=True, exitAfterReadyMarker=str(tier.root / "exited-once"))

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            async with session.post(url + CHAT, json=body(stream=True)) as resp:
                assert resp.status == 200
                events = sse_events(await resp.text())
            assert events[-1] == "[DONE]" and json.loads(events[0])["model"] == "m"
            inst = c.instances["m"]
            assert inst.incarnation == 2 and len(inst.failures) == 1

    tier.run(scenario)


def test_a_stream_that_waited_for_a_load_ends_with_an_error_event_when_no_runtime_answers(tier: Tier):
    tier.model("m")
    tier.script("m", exitAfterReady=True)  # every incarnation vanishes once ready

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            async with session.post(url + CHAT, json=body(stream=True)) as resp:
                assert resp.status == 200
                events = sse_events(await resp.text())
            assert json.loads(events[-1])["error"]["code"] == "upstream_failed"

    tier.run(scenario)


def test_queue_admission_is_decided_before_the_headers_of_a_stream(tier: Tier):
    load = tier.gate("load")
    tier.model("m")
    tier.script("m", loadGate=load)
    tier.gateway(limits={"maxQueue": 1})

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            first = await session.post(url + CHAT, json=body(stream=True))
            assert first.status == 200  # waiting for the load, kept alive
            status, data, _ = await post(session, url + CHAT, body(stream=True))
            assert status == 429 and data["error"]["code"] == "queue_full"
            load.open()
            assert sse_events(await first.text())[-1] == "[DONE]"
            first.release()

    tier.run(scenario)


def test_connections_to_a_runtime_stay_within_its_http_threads(tier: Tier):
    answer = tier.gate("answer")
    tier.model("m", preset={"threadsHttp": 6})  # 6 threads, 4 kept free: at most 2 connections
    tier.script("m", answerGate=answer)
    tier.gateway(healthCheck={"interval": "never"})  # only requests connect: the count below is theirs

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            calls = [asyncio.ensure_future(post(session, url + CHAT, body())) for _ in range(12)]
            await until(lambda: tier.log("m").count("request /v1/chat") >= 2, "the first requests")
            answer.open()
            assert [s for s, _, _ in await asyncio.gather(*calls)] == [200] * 12
            counts = [int(line.rsplit("connections=", 1)[1]) for line in tier.log("m").splitlines()
                      if line.startswith("request /v1/chat")]
            assert len(counts) == 12 and max(counts) <= 2, counts
            assert tier.log("m").count("--threads-http") == 1, "the preset's value, not a second one"

    tier.run(scenario)


def test_a_route_no_runtime_serves_never_starts_a_model(tier: Tier):
    tier.model("m")
    tier.model("loaded")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await post(session, url + CHAT, body("loaded"))
            pid = pid_of(c.instances["loaded"])
            status, data, _ = await post(session, url + "/v1/nonsense", body())
            assert status == 404 and data["error"]["code"] == "unknown_route"
            assert "m" not in c.instances or c.instances["m"].incarnation == 0
            assert c.instances["loaded"].phase is Phase.READY and pid_of(c.instances["loaded"]) == pid

    tier.run(scenario)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_is_answered_with_openai_errors(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            async with session.post(url + CHAT, data=b"[" * 100_000, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
            status, data, _ = await post(session, url + CHAT, body("x" * 2**20))
            assert status == 404 and len(data["error"]["message"]) < 300
            async with session.get(url + CHAT) as r:
                assert r.status == 405 and r.headers["Allow"] and (await r.json())["error"]["message"]
            async with session.delete(url + "/v1/models") as r:
                assert r.status == 405 and "GET" in r.headers["Allow"]

    tier.run(scenario)


def test_an_oversized_body_announced_with_expect_is_refused_before_it_is_sent(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c):
            reader, writer = await asyncio.open_connection("127.0.0.1", tier.port)
            writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{tier.port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {40 * 2**20}\r\nExpect: 100-continue\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
            writer.close()
            assert status_line.startswith(b"HTTP/1.1 413"), status_line

    tier.run(scenario)


def test_a_body_announced_with_expect_gets_100_continue_then_its_answer(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c):
            payload = json.dumps(body()).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", tier.port)
            writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{tier.port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\nExpect: 100-continue\r\n\r\n".encode())
            await writer.drain()
            assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"  # before any of the body is sent
            assert await reader.readline() == b"\r\n"
            writer.write(payload)
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.close()

    tier.run(scenario)


def test_created_is_the_utc_timestamp_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert _created("2026-01-01T00:00:00Z") == 1767225600
    finally:
        monkeypatch.undo()
        time.tzset()


# ---------------------------------------------------------------------------------------------- web pages


async def _status(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, resp.headers


def test_foreign_hosts_are_refused_everywhere(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            foreign = {"Host": "attacker.example"}
            assert (await _status(session, "GET", url + "/v1/models", headers=foreign))[0] == 403
            assert (await _status(session, "POST", url + CHAT, json=body(), headers=foreign))[0] == 403
            assert (await _status(session, "POST", url + "/athanor/v1/models/m/start", headers=foreign))[0] == 403
            assert "m" not in c.instances, "nothing started"
            for host in (f"localhost:{tier.port}", f"127.0.0.1:{tier.port}", f"[::1]:{tier.port}", "localhost"):
                assert (await _status(session, "GET", url + "/v1/models", headers={"Host": host}))[0] == 200, host

    tier.run(scenario)


def test_cross_site_pages_cannot_drive_the_gateway(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            # A form-like text/plain POST needs no preflight: the browser sends it, with its Origin.
            page = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
            status, data, _ = await post(session, url + CHAT, None, data=json.dumps(body()), headers=page)
            assert status == 403 and "evil.example" in data["error"]["message"]
            assert (await _status(session, "POST", url + CHAT, data=json.dumps(body()),
                                  headers={"Sec-Fetch-Site": "cross-site"}))[0] == 403
            assert (await _status(session, "POST", url + "/athanor/v1/models/m/start",
                                  headers={"Origin": "null"}))[0] == 403
            assert "m" not in c.instances, "nothing started"
            # A page served from this machine may call it (without CORS headers, so it cannot read the answer).
            status, _, headers = await post(session, url + CHAT, body(), headers={"Origin": "http://localhost:3000"})
            assert status == 200 and "Access-Control-Allow-Origin" not in headers
            # The admin API takes no browser request at all, not even from this machine.
            assert (await _status(session, "POST", url + "/athanor/v1/models/m/stop",
                                  headers={"Origin": "http://localhost:3000"}))[0] == 403
            assert c.instances["m"].phase is Phase.READY
            # Accepting any Host (a reverse proxy in front) does not accept any page.
            tier.gateway(allowedHosts=["*"])
            assert (await _status(session, "GET", url + "/v1/models", headers={"Host": "proxy.example"}))[0] == 200
            status, _, _ = await post(session, url + CHAT, None, data=json.dumps(body()), headers=page)
            assert status == 403

    tier.run(scenario)


def test_no_runtime_cors_header_reaches_a_client_and_configured_cors_is_answered(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            origin = {"Origin": "https://app.example"}
            for stream in (False, True):  # the scripted runtime sends * on JSON and echoes the origin on SSE
                status, _, headers = await post(session, url + CHAT, body(stream=stream))
                assert status == 200 and not [h for h in headers if h.lower().startswith("access-control-")]
            assert (await post(session, url + CHAT, body(), headers=origin))[0] == 403
            tier.gateway(cors={"allowOrigins": ["https://app.example"]})
            for stream in (False, True):
                status, _, headers = await post(session, url + CHAT, body(stream=stream), headers=origin)
                assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert headers["Vary"] == "Origin"
            preflight = {**origin, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization, content-type"}
            status, headers = await _status(session, "OPTIONS", url + CHAT, headers=preflight)
            assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
            assert "POST" in headers["Access-Control-Allow-Methods"]
            other = {**preflight, "Origin": "https://other.example"}
            status, headers = await _status(session, "OPTIONS", url + CHAT, headers=other)
            assert status == 403 and "Access-Control-Allow-Origin" not in headers

    tier.run(scenario)


@pytest.mark.skipif(lan_address() is None, reason="this machine has no address besides loopback")
def test_the_admin_api_answers_only_on_loopback(tier: Tier):
    tier.model("m")
    lan = lan_address()

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c, host="0.0.0.0"), aiohttp.ClientSession() as session:
            remote = f"http://{lan}:{tier.port}"
            assert (await _status(session, "GET", remote + "/v1/models"))[0] == 200  # listening everywhere
            assert (await _status(session, "GET", remote + "/athanor/v1/status"))[0] == 403
            local = f"http://127.0.0.1:{tier.port}"
            assert (await _status(session, "GET", local + "/athanor/v1/status"))[0] == 200

    tier.run(scenario)
