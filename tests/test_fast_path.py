"""The hot path's common case answered in callbacks (issue 17): a model that serves, a kept-alive connection to it
free, an answer not streamed. Everything else goes the coroutine way, and a failure once sent continues there;
the upstream suites (a dropped kept-alive connection sent again, a killed runtime's requests not sent again, the
idle limit's 504) and the HTTP conformance and fuzz suites run on both. What is the fast lane's own is tested
here: that it is taken, what happens when its client leaves, and that its cheaper parse of the body is json.loads's
exactly. The fast tier: the real controller and ingress, scripted runtimes over loopback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st
from fixtures.tier import Tier, until
from test_ingress import CHAT, body, post
from test_ingress_hardening import hang_up, request_counts, send_post
from test_operations import scrape
from test_upstream_hardening import received

from athanor.ingress.requests import json_body


def test_the_common_case_holds_no_coroutine_per_client_connection(tier: Tier):
    """On the coroutine path each client connection keeps a task while it is open; the fast lane needs none."""
    tier.model("m")
    tier.script("m", keepAliveTimeout=120)

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url:
            async with aiohttp.ClientSession() as first:  # starts the model: the coroutine path
                assert (await post(first, url + CHAT, body()))[0] == 200
            await until(lambda: not c.instances["m"].inflight, "the first request to be over")
            before = len(asyncio.all_tasks())
            clients = [aiohttp.ClientSession() for _ in range(6)]
            try:
                for client in clients:  # one after another: each finds the runtime's kept-alive connection free
                    status, answer, _ = await post(client, url + CHAT, body())
                    assert status == 200 and answer["model"] == "m", answer
                held = len(asyncio.all_tasks()) - before  # the controller's own come and go: a little leeway
                assert held < len(clients) // 2, f"{held} more tasks after {len(clients)} client connections"
            finally:
                await asyncio.gather(*(client.close() for client in clients))

    tier.run(scenario)


def test_a_client_that_leaves_before_its_answer_is_counted_once_and_the_pool_stays_whole(tier: Tier):
    answer = tier.gate("answer")
    tier.model("m")
    tier.script("m", answerGate=answer, keepAliveTimeout=120)
    answer.open()

    async def scenario() -> dict:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            assert (await post(session, url + CHAT, body()))[0] == 200  # started, and a kept-alive connection to it
            answer.path.unlink()  # the runtime holds what comes next
            _, writer = await send_post(tier.port, CHAT, body())
            await until(lambda: received(tier) == 2, "the request to reach the runtime")
            await hang_up(writer)
            inst = c.instances["m"]
            await asyncio.wait_for(inst.until_idle(), 10)  # let go of at once, not when the runtime answers
            answer.open()  # the runtime answers into the connection the gateway closed: nobody reads it
            assert (await post(session, url + CHAT, body()))[0] == 200, "the runtime's connections still serve"
            await until(lambda: received(tier) == 3, "the last request to reach the runtime")
            async with session.get(url + "/metrics") as resp:
                return scrape(await resp.text())

    samples = tier.run(scenario)
    assert request_counts(samples, "m", CHAT) == {"200": 2, "499": 1}


def _outcome(parse: Callable[[bytes], Any], body: bytes) -> tuple[str, str]:
    try:
        return "value", repr(parse(body))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return type(exc).__name__, str(exc)


@settings(max_examples=600, deadline=None)
@given(st.one_of(
    st.binary(max_size=64),
    st.text(alphabet=' \t\n\r{}[]":,.-+eE0123456789aflnrstu\\\ufeff', max_size=48).map(str.encode),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                 max_leaves=12).map(lambda value: json.dumps(value).encode()),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                 max_leaves=12).map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8",
                                                                                                "surrogatepass")),
    st.binary(max_size=12).map(lambda raw: b'{"model": "m", "prompt": "' + raw + b'"}'),  # any bytes in a string
    st.from_regex(rb"\A-?[0-9]{1,40}(\.[0-9]{0,30})?([eE][+-]?[0-9]{1,5})?\Z"),  # numbers, far beyond a float's range
))
def test_the_body_is_parsed_exactly_as_json_loads_parses_it(body: bytes):
    """The body's parse takes msgspec first and skips json.loads's wrappers (``requests.json_body``): every value,
    and every error with its message (which a client reads in the 400), must be json.loads's own."""
    assert _outcome(json_body, body) == _outcome(lambda b: json.loads(b.decode()), body)
