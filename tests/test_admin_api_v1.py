"""What the admin API grew for the TUI (issue 15): the daemon's facts, fit and process figures per model, the status
change feed, metrics as JSON, the daemon's log, models addressed by Hugging Face id, and the read-only admin key.

The fast tier (real controller and ingress in-process, scripted runtimes) for everything but the process figures,
which are read from a real llama-server on the tiny GGUF under a real daemon (``gateway``).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from typing import Any

import aiohttp
import psutil
import pytest

from athanor import __version__, fit
from athanor.cli.admin_client import AdminClient
from athanor.controller.instance import Phase
from fixtures.serving import Gateway, chat
from fixtures.tier import Tier, until
from test_ingress import CHAT, body, post
from test_operations import sample, scrape, stream_chat

V1 = "/athanor/v1"
BANDS = ("comfortable", "tight", "risky", "unknown")


async def follow_sse(session: aiohttp.ClientSession, url: str, into: list[tuple[str, Any]],
                     headers: dict[str, str] | None = None) -> None:
    """Append (event, data) of each Server-Sent Event of ``url`` to ``into`` until cancelled."""
    async with session.get(url, headers={"Accept": "text/event-stream", **(headers or {})}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        kind = "message"
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                into.append((kind, json.loads(line[6:])))
                kind = "message"


def counts(feed: list[tuple[str, Any]], name: str) -> list[tuple[str, int, int]]:
    """(phase, waiting, inflight) of model ``name`` in each status the feed sent, repeats dropped."""
    out: list[tuple[str, int, int]] = []
    for kind, status in feed:
        assert kind == "status"
        inst = status["instances"].get(name)
        if inst is not None:
            entry = (inst["phase"], inst["waiting"], inst["inflight"])
            if not out or out[-1] != entry:
                out.append(entry)
    return out


def test_the_status_feed_shows_a_waiting_then_held_request_and_counts_back_to_zero(tier: Tier):
    load, answer = tier.gate("load"), tier.gate("answer")
    tier.model("m")
    tier.script("m", loadGate=load, answerGate=answer)

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            feed: list[tuple[str, Any]] = []
            follower = asyncio.ensure_future(follow_sse(session, url + V1 + "/status?follow=1", feed))
            await until(lambda: feed, "the status the feed sends at once")
            assert feed[0][1]["apiVersion"] == "v1" and feed[0][1]["pid"] == os.getpid()
            call = asyncio.ensure_future(post(session, url + CHAT, body()))
            await until(lambda: ("Starting", 1, 0) in counts(feed, "m"), "the request seen waiting for the load")
            load.open()
            await until(lambda: ("Ready", 0, 1) in counts(feed, "m"), "the request seen in flight, held")
            assert c.instances["m"].inflight == 1 and not call.done()
            answer.open()
            status, _, _ = await call
            assert status == 200
            await until(lambda: counts(feed, "m")[-1] == ("Ready", 0, 0), "the count back to 0 in the feed")
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        seen = counts(feed, "m")
        assert seen.index(("Starting", 1, 0)) < seen.index(("Ready", 0, 1)) < seen.index(("Ready", 0, 0))

    tier.run(scenario)


def test_a_burst_of_changes_is_coalesced_in_the_status_feed(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            feed: list[tuple[str, Any]] = []
            follower = asyncio.ensure_future(follow_sse(session, url + V1 + "/status?follow=1", feed))
            await until(lambda: feed, "the first status")
            inst = c.instances["m"]
            for _ in range(200):  # 400 changes in one turn of the loop: one update, with the counts as they end
                inst.enter()
                inst.leave()
            inst.enter()
            await until(lambda: len(feed) >= 2, "the update after the burst")
            assert feed[1][1]["instances"]["m"]["inflight"] == 1
            inst.leave()
            await until(lambda: len(feed) >= 3, "the next update")
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        assert len(feed) == 3 and feed[2][1]["instances"]["m"]["inflight"] == 0

    tier.run(scenario)


def test_a_quiet_status_feed_sends_heartbeats(tier: Tier, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ATHANOR_HEARTBEAT_S", "0.05")
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            lines: list[str] = []
            async with session.get(url + V1 + "/status?follow=1") as resp:
                async for raw in resp.content:
                    lines.append(raw.decode().rstrip("\n"))
                    if lines.count(": keep-alive") >= 2:
                        break
        assert lines[0] == "event: status" and lines[1].startswith("data: {")

    tier.run(scenario)


def test_models_by_hf_id_with_their_fit_for_get_post_and_logs(tier: Tier):
    tier.model("m", aliases=["org/tiny-repo"])
    tier._apply([{"apiVersion": "athanor.dev/v1alpha1", "kind": "Model", "metadata": {"name": "gone"},
                  "spec": {"runtime": "llama-server", "source": {"path": str(tier.root / "nowhere.gguf")}}}])

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            base = url + V1 + "/models/org%2Ftiny-repo"
            async with session.get(base) as resp:
                assert resp.status == 200
                view = await resp.json()
            assert view["metadata"]["name"] == "m"
            doc = c.doc()
            estimate = fit.estimate_model(doc, doc["models"]["m"])
            got = view["status"]["fit"]
            assert got["bytes"] == estimate.total > 0 and got["context"] == estimate.context
            assert got["band"] in BANDS[:3]
            assert "process" not in view["status"]  # nothing runs
            async with session.post(base + "/start") as resp:
                assert resp.status == 200
                started = await resp.json()
            assert started["name"] == "m" and started["phase"] == "Ready"
            assert c.instances["m"].phase is Phase.READY
            async with session.get(base + "/logs?lines=5") as resp:
                assert resp.status == 200 and "listening on" in await resp.text()
            async with session.get(url + V1 + "/models") as resp:
                items = {i["metadata"]["name"]: i for i in (await resp.json())["items"]}
            assert items["gone"]["status"]["fit"] == {"band": "unknown", "bytes": 0, "context": 0}
            item = items["m"]
            assert item["status"]["fit"] == got | {"band": item["status"]["fit"]["band"]}
            process = item["status"]["process"]  # the scripted runtime's own process, read through psutil
            assert process["rssBytes"] > 0 and process["cpuPercent"] >= 0
            async with session.post(base + "/stop") as resp:
                assert resp.status == 200 and (await resp.json())["phase"] == "Standby"
            client = AdminClient(f"127.0.0.1:{tier.port}", None)  # the CLI's client sends the id the same way
            restarted = await asyncio.to_thread(client.action, "org/tiny-repo", "start")
            assert restarted["name"] == "m" and restarted["phase"] == "Ready"
            async with session.get(url + V1 + "/models/org%2Fno-such-repo") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"

    tier.run(scenario)


def test_the_read_only_key_grants_gets_and_refuses_posts(tier: Tier):
    admin_keys, read_keys = tier.root / "admin-keys", tier.root / "read-keys"
    admin_keys.write_text("sk-admin\n")
    read_keys.write_text("# dashboards\nsk-read\n")
    tier.gateway(auth={"adminKeyFile": str(admin_keys), "readOnlyKeyFile": str(read_keys)})
    tier.model("m")

    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            for path in (V1 + "/status", V1 + "/models/m", V1 + "/daemon", V1 + "/metrics", "/metrics"):
                async with session.get(url + path, headers=bearer("sk-read")) as resp:
                    assert resp.status == 200, path
            async with session.post(url + V1 + "/models/m/start", headers=bearer("sk-read")) as resp:
                assert resp.status == 403
                error = (await resp.json())["error"]
            assert "read-only" in error["message"] and "POST" in error["message"]
            assert c.instances.get("m") is None or c.instances["m"].phase is Phase.STANDBY  # nothing started
            async with session.delete(url + V1 + "/models/m", headers=bearer("sk-read")) as resp:
                assert resp.status == 403
            async with session.get(url + V1 + "/status") as resp:
                assert resp.status == 401  # an admin key is configured: every request presents one
            async with session.get(url + V1 + "/status", headers=bearer("sk-wrong")) as resp:
                assert resp.status == 401
            async with session.post(url + V1 + "/models/m/start", headers=bearer("sk-admin")) as resp:
                assert resp.status == 200 and (await resp.json())["phase"] == "Ready"

            # Only a read-only key: loopback peers without a key keep what they had; the key admits GETs alone.
            tier.gateway(auth={"readOnlyKeyFile": str(read_keys)})
            async with session.post(url + V1 + "/models/m/stop") as resp:
                assert resp.status == 200
            async with session.post(url + V1 + "/models/m/start", headers=bearer("sk-read")) as resp:
                assert resp.status == 403
            async with session.get(url + V1 + "/status", headers=bearer("sk-wrong")) as resp:
                assert resp.status == 401

            # Unreadable: fail closed for whoever relies on it (503, the why only in the log).
            tier.gateway(auth={"readOnlyKeyFile": str(tier.root / "missing")})
            async with session.get(url + V1 + "/status", headers=bearer("sk-read")) as resp:
                assert resp.status == 503 and "missing" not in await resp.text()

    tier.run(scenario)


def test_metrics_as_json_are_the_counts_metrics_renders(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            for _ in range(3):
                status, _, _ = await post(session, url + CHAT, body())
                assert status == 200
            await stream_chat(session, url)
            status, _, _ = await post(session, url + "/v1/embeddings", {"model": "m", "input": "x"})
            assert status == 400
            async with session.get(url + V1 + "/metrics") as resp:
                assert resp.status == 200
                data = await resp.json()
            async with session.get(url + "/metrics") as resp:
                samples = scrape(await resp.text())
            assert c.instances["m"].inflight == 0
        m = data["models"]["m"]
        got = lambda name, **labels: sample(samples, name, **labels)  # noqa: E731
        assert data["apiVersion"] == "v1" and data["swaps"] == got("athanor_swaps_total") == 0
        assert m["requests"] == 5 and m["errors"] == 1 and m["statuses"] == {"200": 4, "400": 1}
        assert m["promptTokens"] == got("athanor_tokens_total", model="m", kind="prompt") > 0
        assert m["completionTokens"] == got("athanor_tokens_total", model="m", kind="completion") > 0
        assert m["ttftCount"] == got("athanor_time_to_first_token_seconds_count", model="m") == 1
        assert m["ttftSecondsSum"] == got("athanor_time_to_first_token_seconds_sum", model="m") > 0
        assert m["loadCount"] == 1 and m["phase"] == "Ready" and m["inflight"] == 0 and m["waiting"] == 0
        assert data["startTime"] == got("athanor_start_time_seconds")

    tier.run(scenario)


def test_the_daemon_facts_and_its_own_log(tier: Tier):
    tier.gateway(residency={"policy": "memory", "budget": "50%"})
    log = tier.home / "logs" / "daemon.log"

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            async with session.get(url + V1 + "/daemon") as resp:
                assert resp.status == 200
                facts = await resp.json()
            assert facts["apiVersion"] == "v1" and facts["version"] == __version__ and facts["pid"] == os.getpid()
            assert facts["listen"] == facts["admin"] == f"127.0.0.1:{tier.port}"
            assert facts["serviceManager"] == "process" and facts["uptimeSeconds"] >= 0
            assert facts["startedAt"].endswith("Z")
            machine, memory = facts["machine"], facts["memory"]
            assert machine["cores"] == os.cpu_count() and machine["cpu"] and len(machine["load"]) == 3
            total = psutil.virtual_memory().total
            assert memory["totalBytes"] == total and memory["headroomBytes"] == fit.headroom(total)
            assert memory["usedBytes"] == total - memory["availableBytes"]
            assert memory["budgetBytes"] == max(memory["availableBytes"] - fit.headroom(total), 0)
            assert memory["residencyBudgetBytes"] == total // 2

            async with session.get(url + V1 + "/daemon/logs") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "no_log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("one\ntwo\nthree\n")
            async with session.get(url + V1 + "/daemon/logs?lines=2") as resp:
                assert resp.status == 200 and await resp.text() == "two\nthree\n"
            pieces: list[tuple[str, Any]] = []
            follower = asyncio.ensure_future(follow_sse(session, url + V1 + "/daemon/logs?follow=1&lines=1", pieces))
            await until(lambda: pieces, "the last line of the log")
            with log.open("a") as fh:
                fh.write("four\n")
            await until(lambda: any("four" in p[1]["text"] for p in pieces), "the line written next")
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            assert [p[1]["text"] for p in pieces] == ["three\n", "four\n"]

    tier.run(scenario)


# ---------------------------------------------------------------------------------------------- a real daemon


def _get(gateway: Gateway, path: str) -> Any:
    with urllib.request.urlopen(gateway.url + V1 + path, timeout=30) as resp:
        return json.loads(resp.read())


def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return root.memory_info().rss + sum(p.memory_info().rss for p in root.children(recursive=True))


def test_a_real_llama_server_reports_cpu_rss_and_fit_and_the_daemon_its_facts(gateway: Gateway):
    facts = _get(gateway, "/daemon")
    assert facts["pid"] == gateway.proc.pid and facts["listen"] == gateway.url.removeprefix("http://")
    assert facts["admin"] == facts["listen"] and facts["serviceManager"] == "process"
    assert "process" not in _get(gateway, "/models/tiny-gguf")["status"]

    status, started = gateway.post(V1 + "/models/tiny-gguf/start", b"")
    assert status == 200 and started["phase"] == "Ready"
    view = _get(gateway, "/models/tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    assert pid is not None
    process = view["status"]["process"]
    # The first reading of a new runtime is its average since it started: loading the model took CPU time.
    assert process["cpuPercent"] > 0
    rss = _tree_rss(pid)
    assert abs(process["rssBytes"] - rss) < 0.25 * rss
    fit_view = view["status"]["fit"]
    assert fit_view["context"] == 256 and fit_view["bytes"] > 0 and fit_view["band"] in BANDS[:3]  # preset ctxSize

    chat(gateway.client, "tiny-gguf", max_tokens=8)
    again = _get(gateway, "/models")
    [item] = [i for i in again["items"] if i["metadata"]["name"] == "tiny-gguf"]
    assert item["status"]["process"]["cpuPercent"] >= 0 and item["status"]["process"]["rssBytes"] > 0

    status, stopped = gateway.post(V1 + "/models/tiny-gguf/stop", b"")
    assert status == 200 and stopped["phase"] == "Standby"
    assert "process" not in _get(gateway, "/models/tiny-gguf")["status"]
