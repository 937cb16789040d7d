"""Is a runtime ready to answer? One probe per runtime, because their health endpoints differ.

llama-server's ``/health`` is 503 while loading and 200 when ready. mlx_lm.server's ``/health`` says ok before the
weights are loaded, so the only honest probe is a one-token completion.

How often to probe (``poll_delay``): every ``FIRST_DELAY`` at first, then a fixed share (``RELATIVE_DELAY``) of the
time waited so far, up to ``MAX_DELAY``. Readiness is then noticed within about 2% of the load however long it is:
a tiny model that loads in 20 ms is seen within a few milliseconds (a probe of a port nobody listens on yet is a
refused connect on loopback), and one that loads for minutes is probed about once a second. A fixed floor that
backs off per probe (it used to be 20 ms doubling to 250 ms) cost a fast swap more than the runtime's own load.
Besides, a runtime that writes to its log is probed again at once (``log_watch.py``; at most once per
``WRITTEN_SHARE`` of the interval, for runtimes that log all along): runtimes log their readiness as it happens,
so it is seen within one probe rather than half a poll interval.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import Awaitable, Callable

import aiohttp

from athanor.addresses import authority
from athanor.runtimes.launch import LaunchSpec
from athanor.runtimes.secret import secret_headers

FIRST_DELAY = 0.002
ALIVE_EVERY_S = 0.01  # how often a start asks whether the process still runs (a death is seen within this)
RELATIVE_DELAY = 0.02
WRITTEN_SHARE = 0.1  # log writes bring probes forward at most once per this share of the poll interval
MAX_DELAY = 1.0


class NotReady(Exception):
    """The runtime exited or did not become ready in time; the message says which."""


class StartAborted(Exception):
    """A stop asked the start under way to give up."""


def probe_session() -> aiohttp.ClientSession:
    """The controller's client for readiness and liveness probes. It keeps no connection open between probes: an
    idle kept-alive connection would pin one of the runtime's HTTP threads."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                                 cookie_jar=aiohttp.DummyCookieJar())


async def probe_once(session: aiohttp.ClientSession, launch: LaunchSpec, timeout: float) -> bool:
    """True when ready, False when not yet. Raises NotReady when the runtime answers that it never will:
    mlx_lm.server keeps running after its model failed to load and answers every request with an error."""
    base = f"http://{authority(launch.host, launch.port)}"
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    headers = secret_headers(launch.secret)
    try:
        if launch.runtime == "mlx-lm":
            body = {"model": launch.served_model, "prompt": "hi", "max_tokens": 1, "stream": False}
            async with session.post(f"{base}/v1/completions", json=body, headers=headers,
                                    timeout=client_timeout) as resp:
                answer = await resp.read()
                if resp.status in (200, 503):
                    return resp.status == 200
                raise NotReady(f"the runtime answered {resp.status}: {_error_text(answer)} (see 'athanor logs')")
        return await health_status(launch.host, launch.port, launch.health_path, launch.secret, timeout) == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def health_status(host: str, port: int, path: str, secret: str | None, timeout: float) -> int | None:
    """The status of ``GET path`` on a fresh connection; None while nothing listens there (or on a
    garbled answer). A bare request and its status line rather than a client session: while a runtime loads this
    runs every couple of milliseconds, on the cores its load needs, and a refused connect then costs next to
    nothing."""
    loop = asyncio.get_running_loop()
    auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {authority(host, port)}\r\n{auth}Connection: close\r\n\r\n".encode()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)  # a pod may be v6
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, request)
            head = b""
            while b"\r\n" not in head and len(head) < 1024:
                chunk = await loop.sock_recv(sock, 1024)
                if not chunk:
                    return None
                head += chunk
        parts = head.split(b" ", 2)
        return int(parts[1]) if len(parts) > 2 and parts[0].startswith(b"HTTP/") else None
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip() or "no details"


def poll_delay(waited: float) -> float:
    """Seconds until the next probe of a runtime that is not ready after ``waited`` seconds."""
    return min(max(FIRST_DELAY, waited * RELATIVE_DELAY), MAX_DELAY)


async def wait_ready(
    session: aiohttp.ClientSession, locate: Callable[[], LaunchSpec | None], *, timeout: float,
    alive: Callable[[], Awaitable[bool]], abort: asyncio.Event, written: asyncio.Event | None = None,
) -> tuple[float, LaunchSpec]:
    """Poll until ready; returns the seconds waited and the launch at the address it answered on. ``locate``: the
    launch where the runtime answers now, None while that is not known (a pod not yet placed). Raises NotReady if
    the process dies or time runs out, and StartAborted as soon as ``abort`` is set (a probe in flight does not
    hold it up). ``written``: set when the runtime writes to its log, which cuts the wait for the next probe."""
    started = time.monotonic()
    deadline = started + timeout
    next_alive_check = started
    aborted = asyncio.ensure_future(abort.wait())
    heard_at = -math.inf  # when a log write last brought a probe forward
    try:
        while True:
            if written is not None:
                written.clear()  # a write from here on, during the probe too, brings the next one forward
            if time.monotonic() >= next_alive_check:  # asking the manager costs more than a probe: not every time
                if not await alive():
                    raise NotReady("the runtime exited while starting")
                next_alive_check = time.monotonic() + ALIVE_EVERY_S
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotReady(f"not ready after {timeout:.0f} s (startupTimeout)")
            launch = locate()
            if launch is not None:
                probe = asyncio.ensure_future(probe_once(session, launch, timeout=max(remaining, 0.05)))
                await asyncio.wait({probe, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if aborted.done():
                    probe.cancel()
                    raise StartAborted()
                if probe.result():
                    return time.monotonic() - started, launch
            now = time.monotonic()
            pause = min(poll_delay(now - started), max(deadline - now, 0))
            if written is None:
                await asyncio.wait({aborted}, timeout=pause)  # the poll interval, cut short by an abort
                continue
            # ... or by a log write (one during the probe too), though no sooner than a share of the interval after
            # the last probe a write brought forward: a runtime that logs all along must not be probed back to back.
            hold = heard_at + pause * WRITTEN_SHARE - now
            if hold > 0:
                await asyncio.wait({aborted}, timeout=hold)
            if not written.is_set():
                heard = asyncio.ensure_future(written.wait())
                await asyncio.wait({aborted, heard}, timeout=max(now + pause - time.monotonic(), 0),
                                   return_when=asyncio.FIRST_COMPLETED)
                heard.cancel()
            if written.is_set():
                heard_at = time.monotonic()
    finally:
        aborted.cancel()


async def answers(session: aiohttp.ClientSession, launch: LaunchSpec, timeout: float) -> bool:
    """Liveness after readiness: does the runtime answer ``GET /health`` at all, within ``timeout``?

    Every runtime serves ``/health`` from its HTTP threads without touching the model, so a busy runtime still
    answers it; one that does not (frozen, deadlocked, swapping itself to death) is not serving anyone.
    It carries the runtime's secret, so the probe is served like the gateway's requests rather than refused at the
    door.
    """
    try:
        async with session.get(f"http://{authority(launch.host, launch.port)}/health",
                               headers=secret_headers(launch.secret),
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return True
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


TEST_REQUESTS: dict[str | None, tuple[str, dict[str, object]]] = {  # a model's task -> its cheapest real request
    None: ("/v1/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0}),
    "embedding": ("/v1/embeddings", {"input": "Hello"}),
    "rerank": ("/v1/rerank", {"query": "Hello", "documents": ["Hello"]}),
}


async def generates(session: aiohttp.ClientSession, launch: LaunchSpec, timeout: float,
                    task: str | None = None) -> str | None:
    """Can the runtime do its job once (one token; one embedding; one score)? None when it can, else what went
    wrong. The health check after a run of server errors: one short request, only when requests already fail."""
    route, request = TEST_REQUESTS[task]
    body = {"model": launch.served_model, **request}
    try:
        async with session.post(f"http://{authority(launch.host, launch.port)}{route}", json=body,
                                headers=secret_headers(launch.secret),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text(errors="replace")
            return None if resp.status == 200 else f"HTTP {resp.status}: {text[:200]}"
    except TimeoutError:
        return f"no answer in {timeout:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
