"""The guard against what browsers and careless clients actually send: preflights without keys, key bytes that are
not UTF-8, and a key file the gateway cannot read. Fast tier: the real controller and ingress in this process."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from fixtures.tier import Tier
from test_ingress import CHAT, body, post

APP = "http://app.example"


def test_a_cors_preflight_needs_no_key_but_the_request_it_clears_does(tier: Tier):
    keys = tier.root / "keys"
    keys.write_text("sk-right\n")
    tier.gateway(auth={"apiKeyFile": str(keys)}, cors={"allowOrigins": [APP]})

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            asked = {"Origin": APP, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
            async with session.options(url + CHAT, headers=asked) as resp:  # what a browser sends: no key
                assert resp.status == 204, await resp.text()
                assert resp.headers["Access-Control-Allow-Origin"] == APP
                assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            status, reply, headers = await post(session, url + CHAT, body(), headers={"Origin": APP})
            assert status == 401 and reply["error"]["type"] == "authentication_error"
            assert headers["Access-Control-Allow-Origin"] == APP, "the page may read why it was refused"
            async with session.get(url + "/v1/models", headers={"Origin": APP,
                                                                "Authorization": "Bearer sk-right"}) as resp:
                assert resp.status == 200
            async with session.options(url + CHAT, headers={**asked, "Origin": "http://evil.example"}) as resp:
                assert resp.status == 403, "an origin the Gateway does not list gets no preflight answer"
            async with session.options(url + CHAT) as resp:
                assert resp.status == 401, "an OPTIONS that is no preflight still needs the key"

    tier.run(scenario)


def test_a_keyless_request_that_asks_100_continue_is_refused_before_its_body_with_the_auth_challenge(tier: Tier):
    keys = tier.root / "keys"
    keys.write_text("sk-right\n")
    tier.gateway(auth={"apiKeyFile": str(keys)})

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c):
            status, headers, content = await raw_request(tier.port, (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"))  # the body is never sent
            assert status == 401 and headers["www-authenticate"] == "Bearer", headers
            assert json.loads(content)["error"]["code"] == "invalid_api_key"

    tier.run(scenario)


async def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` as it is (bytes no HTTP client would send) and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        answer = await reader.read()  # Connection: close: the answer ends with the connection
    finally:
        writer.close()
    top, _, content = answer.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, content


@pytest.mark.parametrize("path", ["/v1/models", "/athanor/v1/status"])
def test_key_bytes_that_are_not_utf8_are_refused_in_json(tier: Tier, path: str):
    keys = tier.root / "keys"
    keys.write_text("sk-right\n")
    tier.gateway(auth={"apiKeyFile": str(keys), "adminKeyFile": str(keys)})

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c):
            head = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
                    + b"Authorization: Bearer \xff\xfe\r\n\r\n")
            status, headers, content = await raw_request(tier.port, head)
            assert status == 401, content
            assert headers["content-type"].startswith("application/json")
            reply = json.loads(content)
            assert reply["error"]["type"] == "authentication_error" and "not valid" in reply["error"]["message"]

    tier.run(scenario)


def test_an_unreadable_key_file_is_named_in_the_log_never_to_a_client(tier: Tier, caplog: pytest.LogCaptureFixture):
    missing = tier.root / "private-dir" / "api-keys"
    tier.gateway(auth={"apiKeyFile": str(missing), "adminKeyFile": str(missing)})
    caplog.set_level(logging.ERROR, logger="athanor")

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            for path, headers in ((CHAT, {}), (CHAT, {"Authorization": "Bearer x"}),
                                  ("/athanor/v1/status", {"Authorization": "Bearer x"}), ("/metrics", {})):
                async with session.post(url + path, json=body(), headers=headers) if path == CHAT else \
                        session.get(url + path, headers=headers) as resp:
                    text = await resp.text()
                    assert resp.status == 503, (path, text)
                    assert str(missing) not in text and "private-dir" not in text, text
                    assert "key configuration is unreadable" in json.loads(text)["error"]["message"]

    tier.run(scenario)
    logged = [r.getMessage() for r in caplog.records if str(missing) in r.getMessage()]
    assert logged, caplog.text
    assert len(logged) == 2, "once for each kind of key, not once per request"
