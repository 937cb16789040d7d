"""The gateway -> runtime hop and the gateway's own HTTP server, hardened: a request a runtime accepted is never
sent twice, limits follow the Gateway spec while it serves, and malformed or slow clients get the gateway's answer.

The first tests run the fast tier (the real controller and ingress against scripted runtimes killed for real);
the others speak raw bytes to the real ingress, so each controls exactly what the wire carries.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from athanor.ingress.app import create_app
from athanor.ingress.protocol import GatewayRunner
from athanor.ingress.upstream import UpstreamPool
from conftest import ATHANOR, RunCLI, write
from fixtures.tier import Tier, pid_of, until

CHAT = "/v1/chat/completions"


def body(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def post(session: aiohttp.ClientSession, url: str, payload: Any, **kwargs: Any) -> tuple[int, Any]:
    async with session.post(url, json=payload, **kwargs) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def gone(proc: psutil.Process) -> bool:
    """Dead (a zombie until the supervisor reaps it: the reaping is the supervisor's, never the test's)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def received(tier: Tier, name: str = "m") -> int:
    """Chat requests the model's runtimes received, every incarnation counted (they log to one file)."""
    return tier.log(name).count(f"request {CHAT} ")


# ------------------------------------------------------------------------------------------ run at most once


def test_requests_a_killed_runtime_had_accepted_on_kept_alive_connections_are_not_sent_again(tier: Tier):
    """Each held request came on a kept-alive connection; the runtime read it and was killed. The connection then
    closes before any answer, exactly as an idle drop does, but the request was accepted: it must fail (502), not
    run again on the next runtime (a prompt that crashed one runtime would crash the next)."""
    n = 6
    answer = tier.gate("answer")
    tier.model("m")
    tier.script("m", answerGate=answer, keepAliveTimeout=120)  # kept-alive connections stay open meanwhile
    tier.gateway(healthCheck={"interval": "never"})

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            # n connections to the runtime, left idle and kept alive: n requests held at once, then answered.
            warm = [asyncio.ensure_future(post(session, url + CHAT, body())) for _ in range(n)]
            await until(lambda: received(tier) == n or any(w.done() for w in warm), f"{n} requests in flight")
            assert not any(w.done() for w in warm), [w.result() for w in warm if w.done()]
            answer.open()
            assert [s for s, _ in await asyncio.gather(*warm)] == [200] * n
            answer.path.unlink()  # the gate closes again: the next requests are held
            inst = c.instances["m"]
            runtime = psutil.Process(pid_of(inst))
            held = [asyncio.ensure_future(post(session, url + CHAT, body())) for _ in range(n)]
            await until(lambda: received(tier) == 2 * n or any(h.done() for h in held), f"{n} more requests accepted")
            assert not any(h.done() for h in held), [h.result() for h in held if h.done()]
            os.kill(runtime.pid, signal.SIGKILL)
            await until(lambda: gone(runtime), "the runtime to die")  # what it accepted, it can no longer answer
            answer.open()  # a request sent again would now be answered, by the next runtime
            results = await asyncio.gather(*held)
            codes = [(s, d.get("error", {}).get("code") if isinstance(d, dict) else d) for s, d in results]
            assert codes == [(502, "upstream_failed")] * n, f"sent again: {codes}, {received(tier)} received"
            assert received(tier) == 2 * n, "a request the killed runtime had accepted was sent again"
            assert len(inst.failures) == 1 and inst.last_failure["reason"] == "Crashed"

    tier.run(scenario)


def test_a_kept_alive_connection_the_live_runtime_drops_as_a_request_goes_out_is_sent_again_on_a_fresh_one(
        tier: Tier):
    """The runtime reads the request and closes the connection without answering, but stays alive (it dropped a
    kept-alive connection, as llama-server was seen to under load). It did not die of the request, so the request
    goes again, on a new connection, and the client gets its answer; the runtime is not counted as crashed."""
    tier.model("m")
    tier.script("m", dropKeptAlive=True, keepAliveTimeout=120)
    tier.gateway(healthCheck={"interval": "never"})

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            first = await post(session, url + CHAT, body())
            second = await post(session, url + CHAT, body())  # on the gateway's kept-alive connection: dropped
            assert [first[0], second[0]] == [200, 200], (first, second)
            log = tier.log("m")
            assert log.count(f"dropped {CHAT}") == 1 and received(tier) == 3, log
            inst = c.instances["m"]
            assert inst.incarnation == 1 and not inst.failures, "the runtime was alive: not a crash"

    tier.run(scenario)


# ------------------------------------------------------------------------------------------ limits follow the spec


def test_the_body_limit_and_the_upstream_idle_limit_follow_the_gateway_spec_while_serving(tier: Tier):
    answer = tier.gate("answer")
    tier.model("m")
    tier.script("m", answerGate=answer)
    answer.open()
    big = body(messages=[{"role": "user", "content": "x" * 4000}])  # about 4 KiB

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            assert (await post(session, url + CHAT, big))[0] == 200
            tier.gateway(limits={"maxRequestBytes": 2048})
            status, data = await post(session, url + CHAT, big)
            assert (status, data["error"]["code"]) == (413, "request_too_large")
            assert "limit of 2048 bytes" in data["error"]["message"]
            # Asked first with Expect: 100-continue, the refusal comes before the body, from the same limit.
            status, data = await post(session, url + CHAT, big, expect100=True)
            assert (status, data["error"]["code"]) == (413, "request_too_large")
            assert (await post(session, url + CHAT, body()))[0] == 200
            tier.gateway(limits={"maxRequestBytes": 1_000_000, "upstreamIdleTimeout": "1s"})
            assert (await post(session, url + CHAT, big))[0] == 200
            answer.path.unlink()  # the runtime now sends nothing: the new idle limit ends the request
            status, data = await asyncio.wait_for(post(session, url + CHAT, body()), 30)
            assert status == 504 and "sent nothing for 1 s" in data["error"]["message"], data

    tier.run(scenario)


# ------------------------------------------------------------------------------------------ the gateway's own server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer to the end of the connection (the gateway closes after an error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, payload


def answers(port: int) -> bool:
    try:
        return exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")[0] == 200
    except OSError:
        return False


@pytest.fixture
def daemon(home: Path, cli: RunCLI, tmp_path: Path) -> Iterator[int]:
    """``athanor serve`` on a free loopback port, with no models; its port. Stopped at the end, even on failure."""
    port = free_port()
    spec = write(tmp_path / "gateway.yaml", "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\n"
                 f"metadata: {{name: default}}\nspec:\n  listen: 127.0.0.1:{port}\n")
    assert cli("apply", "-f", str(spec)).returncode == 0
    proc = subprocess.Popen([ATHANOR, "serve"], env=dict(os.environ), stdout=open(tmp_path / "daemon.log", "ab"),
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not answers(port):
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon never answered /health"
            time.sleep(0.05)  # polling another process, with a deadline
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


MALFORMED = {
    "a bad request line": b"GARBAGE\r\n\r\n",
    "Content-Length with Transfer-Encoding": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                             b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a negative Content-Length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
    "NUL in a header": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: a\x00b\r\n\r\n",
    "a path that is not UTF-8": b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}


def test_the_daemon_answers_what_aiohttp_cannot_parse_and_a_new_body_limit_as_json(daemon: int, cli: RunCLI,
                                                                                   tmp_path: Path):
    for what, raw in MALFORMED.items():
        status, headers, payload = exchange(daemon, raw)
        assert status == 400 and headers.get("content-type", "").startswith("application/json"), (what, payload)
        error = json.loads(payload)["error"]
        assert error["code"] == "bad_request" and error["message"].startswith("malformed HTTP request: "), what
    # The daemon follows limits.maxRequestBytes as applied, without a restart.
    chat = json.dumps(body("nope", messages=[{"role": "user", "content": "x" * 4000}])).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(chat), chat))
    assert exchange(daemon, request)[0] == 404, "under the limit: read, and the model is unknown"
    spec = write(tmp_path / "limited.yaml", "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\n"
                 f"metadata: {{name: default}}\nspec:\n  listen: 127.0.0.1:{daemon}\n"
                 "  limits: {maxRequestBytes: 2048}\n")
    assert cli("apply", "-f", str(spec)).returncode == 0
    status, _, payload = exchange(daemon, request)
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"


def test_a_connection_that_never_completes_its_headers_is_closed(tier: Tier):
    async def scenario() -> None:
        async with tier.controller() as c:
            app = create_app(c, UpstreamPool(), "127.0.0.1")
            runner = GatewayRunner(app, access_log=None, handler_cancellation=True, header_timeout=0.3)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                prompt = asyncio.open_connection("127.0.0.1", port)
                (prompt_reader, prompt_writer), (slow_reader, slow_writer) = await asyncio.gather(
                    prompt, asyncio.open_connection("127.0.0.1", port))
                health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                prompt_writer.write(health)
                assert (await read_response(prompt_reader))[0] == 200
                slow_writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
                assert await asyncio.wait_for(slow_reader.read(), 10) == b"", "closed, without an answer"
                # The deadline is for a request's headers only: the prompt client, kept alive as long, is served.
                prompt_writer.write(health)
                assert (await read_response(prompt_reader))[0] == 200
                for writer in (prompt_writer, slow_writer):
                    writer.close()
            finally:
                await runner.cleanup()

    tier.run(scenario)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return int(head.split()[1]), await reader.readexactly(length)
