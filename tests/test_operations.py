"""Operations in the fast tier: the real controller and ingress in-process, scripted runtimes over real HTTP.

Metrics that match what clients saw, the event feed and its SSE stream, the admin API, health after readiness
(a runtime that is alive but answers errors), API keys, errors in the caller's format, and spec changes that
restart only what they change.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from athanor.controller.instance import Phase
from fixtures.tier import Tier, pid_of, until
from test_ingress import CHAT, body, post


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, parsed by prometheus-client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def stream_chat(session: aiohttp.ClientSession, url: str, **extra: Any) -> list[dict[str, Any]]:
    async with session.post(url + CHAT, json=body(stream=True, **extra)) as resp:
        assert resp.status == 200
        text = await resp.text()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_metrics_count_exactly_what_a_scripted_run_did(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            seen_prompt = seen_completion = 0
            for _ in range(5):
                status, reply, _ = await post(session, url + CHAT, body())
                assert status == 200
                seen_prompt += reply["usage"]["prompt_tokens"]
                seen_completion += reply["usage"]["completion_tokens"]
            for _ in range(3):
                chunks = await stream_chat(session, url)
                usage = [ch["usage"] for ch in chunks if ch.get("usage")]
                seen_prompt += sum(u["prompt_tokens"] for u in usage)
                seen_completion += sum(u["completion_tokens"] for u in usage)
            status, _, _ = await post(session, url + "/v1/embeddings", {"model": "m", "input": "x"})
            assert status == 400  # a chat model asked for embeddings: the gateway's 400, counted as such
            async with session.get(url + "/metrics") as resp:
                assert resp.status == 200
                samples = scrape(await resp.text())
        got = lambda name, **labels: sample(samples, name, **labels)  # noqa: E731
        assert got("athanor_requests_total", model="m", route=CHAT, status="200") == 8
        assert got("athanor_requests_total", model="m", route="/v1/embeddings", status="400") == 1
        assert got("athanor_request_duration_seconds_count", model="m", route=CHAT) == 8
        assert got("athanor_time_to_first_token_seconds_count", model="m") == 3
        assert got("athanor_tokens_total", model="m", kind="prompt") == seen_prompt == 8
        assert got("athanor_tokens_total", model="m", kind="completion") == seen_completion == 8
        assert got("athanor_load_seconds_count", model="m") == 1
        assert got("athanor_model_phase", model="m", phase="Ready") == 1
        assert got("athanor_model_phase", model="m", phase="Standby") == 0
        assert got("athanor_queue_depth", model="m") == 0

    tier.run(scenario)


def test_swaps_and_evictions_are_events_and_metrics(tier: Tier):
    tier.model("a")
    tier.model("b")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            for model in ("a", "b", "a"):
                status, _, _ = await post(session, url + CHAT, body(model))
                assert status == 200
            async with session.get(url + "/metrics") as resp:
                samples = scrape(await resp.text())
            async with session.get(url + "/athanor/v1/events") as resp:
                events = (await resp.json())["items"]
        assert sample(samples, "athanor_swaps_total") == 2
        assert sample(samples, "athanor_evictions_total", model="a") == 1
        assert sample(samples, "athanor_evictions_total", model="b") == 1
        reasons = [(e["name"], e["reason"]) for e in events]
        assert reasons.count(("b", "Swapping")) == 1 and reasons.count(("a", "Evicted")) == 1
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        ready = [e for e in events if e["reason"] == "Ready"]
        assert len(ready) == 3 and all(e["loadSeconds"] > 0 for e in ready)

    tier.run(scenario)


def test_the_event_stream_replays_from_since_then_follows(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            last = c.events.since()[-1]["seq"]
            seen: list[dict[str, Any]] = []

            async def follow() -> None:
                async with session.get(url + f"/athanor/v1/events?follow=1&since={last}") as resp:
                    assert resp.headers["Content-Type"].startswith("text/event-stream")
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if line.startswith("data: "):
                            seen.append(json.loads(line[6:]))
                            if seen[-1].get("phase") == "Ready":
                                return

            follower = asyncio.ensure_future(follow())
            await until(lambda: c.events._streams, "the stream is subscribed")
            await c.restart("m")
            await asyncio.wait_for(follower, 10)
        phases = [e.get("phase") for e in seen if "phase" in e]
        assert phases == ["Draining", "Stopping", "Standby", "Starting", "Ready"]
        assert all(e["seq"] > last for e in seen)

    tier.run(scenario)


def test_a_runtime_that_answers_only_errors_is_restarted_and_says_why(tier: Tier):
    tier.model("m")
    tier.script("m", answerStatus=500)

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            for _ in range(3):  # healthCheck.failureThreshold
                status, reply, _ = await post(session, url + CHAT, body())
                assert status == 500 and reply["error"]["message"] == "scripted failure"
            inst = c.instances["m"]
            await until(lambda: inst.phase is Phase.FAILED, "the test generation failed too")
            assert inst.last_failure["reason"] == "Unhealthy"
            assert "3 requests in a row answered HTTP 500" in inst.message
            assert any(e["reason"] == "Unhealthy" for e in c.events.since())
            tier.script("m")  # the next runtime is healthy
            status, _, _ = await post(session, url + CHAT, body())
            assert status == 200 and inst.incarnation == 2

    tier.run(scenario)


def test_errors_that_are_the_requests_fault_do_not_restart_a_runtime_that_generates(tier: Tier):
    tier.model("m")
    tier.script("m", answerStatus=500, failWhen="poison")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            poison = {"model": "m", "messages": [{"role": "user", "content": "poison"}]}
            for _ in range(3):
                status, _, _ = await post(session, url + CHAT, poison)
                assert status == 500
            inst = c.instances["m"]
            pid = pid_of(inst)
            await until(lambda: inst.error_streak == 0, "the test generation succeeded")
            assert inst.phase is Phase.READY and pid_of(inst) == pid and inst.incarnation == 1
            status, _, _ = await post(session, url + CHAT, body())
            assert status == 200

    tier.run(scenario)


def test_api_keys_refuse_wrong_and_missing_keys_and_admit_the_right_one(tier: Tier):
    keys = tier.root / "keys"
    keys.write_text("# ingress keys\nsk-right\n")
    admin_keys = tier.root / "admin-keys"
    admin_keys.write_text("sk-admin\n")
    tier.gateway(auth={"apiKeyFile": str(keys), "adminKeyFile": str(admin_keys)})
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            status, reply, headers = await post(session, url + CHAT, body())
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
            assert reply["error"]["type"] == "authentication_error" and "required" in reply["error"]["message"]
            status, reply, _ = await post(session, url + CHAT, body(), headers={"Authorization": "Bearer sk-wrong"})
            assert status == 401 and "not valid" in reply["error"]["message"]
            status, _, _ = await post(session, url + CHAT, body(), headers={"Authorization": "Bearer sk-right"})
            assert status == 200
            status, _, _ = await post(session, url + CHAT, body(), headers={"x-api-key": "sk-right"})
            assert status == 200
            async with session.get(url + "/v1/models") as resp:
                assert resp.status == 401
            async with session.get(url + "/health") as resp:
                assert resp.status == 200  # liveness stays open
            # The admin API and /metrics take the admin key (the API key is not one), even from loopback.
            for key, wanted in ((None, 401), ("sk-right", 401), ("sk-admin", 200)):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with session.get(url + "/athanor/v1/status", headers=headers) as resp:
                    assert resp.status == wanted
                async with session.get(url + "/metrics", headers=headers) as resp:
                    assert resp.status == wanted
            keys.write_text("sk-rotated\n")  # a rotated key counts within a second, without a restart
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                async with session.get(url + "/v1/models", headers={"Authorization": "Bearer sk-rotated"}) as resp:
                    if resp.status == 200:
                        break
                assert asyncio.get_running_loop().time() < deadline, "the rotated key was never admitted"
                await asyncio.sleep(0.05)  # polling for the key file's re-read, bounded by the deadline

    tier.run(scenario)


def test_an_unreadable_key_file_fails_closed(tier: Tier):
    tier.gateway(auth={"apiKeyFile": str(tier.root / "missing-keys")})
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            status, reply, _ = await post(session, url + CHAT, body(), headers={"Authorization": "Bearer x"})
            assert status == 503 and "key configuration is unreadable" in reply["error"]["message"]
            assert "m" not in c.instances or c.instances["m"].phase is Phase.STANDBY

    tier.run(scenario)


def test_anthropic_clients_get_errors_in_anthropics_shape(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            status, reply, _ = await post(session, url + "/v1/messages", {"model": "nope", "max_tokens": 5,
                                                                          "messages": []})
            assert status == 404
            assert reply["type"] == "error" and reply["error"]["type"] == "not_found_error"
            assert "nope" in reply["error"]["message"]
            status, reply, _ = await post(session, url + "/v1/messages", {"max_tokens": 5})
            assert status == 400 and reply["error"]["type"] == "invalid_request_error"
            status, reply, _ = await post(session, url + CHAT, {"model": "nope"})
            assert status == 404 and reply["error"]["code"] == "model_not_found"  # OpenAI's shape elsewhere

    tier.run(scenario)


def test_a_spec_change_restarts_only_the_model_whose_launch_changed(tier: Tier):
    tier.gateway(residency={"policy": "memory", "budget": "100%"})
    tier.model("a")
    tier.model("b")

    async def scenario() -> None:
        async with tier.controller() as c:
            await c.start("a")
            await c.start("b")
            a, b = c.instances["a"], c.instances["b"]
            pid_a, pid_b = pid_of(a), pid_of(b)
            tier.model("a", aliases=["alpha"])  # routing only: nothing the runtime runs changes
            await until(lambda: a.generation == 2, "generation 2 observed")
            assert pid_of(a) == pid_a and a.incarnation == 1
            tier.model("a", aliases=["alpha"], preset={"ctxSize": 512})  # its argv changes
            await until(lambda: a.incarnation == 2 and a.phase is Phase.READY, "a restarted")
            assert a.generation == 3 and pid_of(a) != pid_a
            assert pid_of(b) == pid_b and b.incarnation == 1 and b.phase is Phase.READY
            reasons = [e["reason"] for e in c.events.since() if e["name"] == "a"]
            assert "SpecObserved" in reasons and "SpecChanged" in reasons

    tier.run(scenario)


def test_a_followed_log_goes_on_across_a_restart_and_unload_stops_the_model(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            seen: list[str] = []

            async def follow() -> None:
                async with session.get(url + "/athanor/v1/models/m/logs?follow=1&lines=1") as resp:
                    assert resp.status == 200
                    async for raw in resp.content:
                        seen.append(raw.decode())
                        if "listening on" in seen[-1] and any("runtime 2 of m" in line for line in seen):
                            return

            follower = asyncio.ensure_future(follow())
            await until(lambda: seen, "the log's last line")
            await c.restart("m")
            await asyncio.wait_for(follower, 10)
            assert seen[0].startswith("listening on")  # lines=1: the last line before following
            assert any("starting:" in line for line in seen[1:]), "the next runtime's own lines follow"
            async with session.post(url + "/athanor/v1/models/m/unload") as resp:
                assert resp.status == 200 and (await resp.json())["phase"] == "Standby"
            async with session.get(url + "/athanor/v1/models/m") as resp:
                view = await resp.json()
            assert view["status"]["phase"] == "Standby"
            assert [c["type"] for c in view["status"]["conditions"]] == ["Available", "Ready", "Progressing", "Failed"]

    tier.run(scenario)
