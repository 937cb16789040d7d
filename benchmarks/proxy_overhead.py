"""Proxy overhead: the gateway against the same runtime called directly, measured in the same run.

    .venv/bin/python benchmarks/proxy_overhead.py [--requests 300] [--concurrency 8] [--seconds 3] [--rounds 3]

Prints p50 added latency, requests/s ratio, streaming throughput ratio, swap overhead beyond the runtime's own
start, and the gateway's own CPU time per proxied request next to that of a minimal aiohttp app under the same
load (the floor under any aiohttp-based ingress). Targets
(from the serving issue): added p50 <= 0.5 ms, rps >= 0.85x, streaming >= 0.99x, swap overhead <= 100 ms.

Uses a tiny random-weight GGUF so the runtime's own work is as small as it gets, which makes the proxy's share as
large as it gets. The runtime gets ``--runtime-threads`` (default 1): llama-server's default spins a thread per
core while it waits for work, and on a 2-core machine that spinning, not the proxy, would decide the figures.
Throughput and streaming rounds alternate direct and proxied so drift in machine load hits both alike; ratios
are of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
from _gateway import free_port, gateway, wait_listening

BODY = {"model": "m1", "prompt": "hi", "max_tokens": 1, "temperature": 0}
# The floor under any aiohttp-based ingress: an app with one route that reads the body and answers a fixed one.
MINIMAL_AIOHTTP_APP = """
import asyncio, sys, uvloop
from aiohttp import web
async def answer(request):
    await request.read()
    return web.json_response({"ok": True})
async def main():
    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def timed(session: aiohttp.ClientSession, url: str, body: dict, headers: dict[str, str] | None = None
                ) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}")
    return time.perf_counter() - started


async def admin_status(session: aiohttp.ClientSession, gateway: str) -> dict:
    """The daemon's live state (state.json follows it a moment later)."""
    async with session.get(gateway + "/athanor/v1/status") as resp:
        return await resp.json()


async def latency(session: aiohttp.ClientSession, direct: str, proxied: str, n: int) -> tuple[float, float]:
    d, p = [], []
    for _ in range(n):  # interleaved, so drift in machine load hits both sides alike
        d.append(await timed(session, direct, {**BODY, "model": "m1"}))
        p.append(await timed(session, proxied, BODY))
    return statistics.median(d), statistics.median(p)


async def throughput(session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float,
                     headers: dict[str, str] | None = None) -> float:
    """Requests/s of ``concurrency`` clients sending 1-token completions back to back for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await timed(session, url, BODY, headers)
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / seconds


async def paced(session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float, rate: float,
                headers: dict[str, str] | None = None) -> float:
    """Requests/s of ``concurrency`` clients offering ``rate`` requests/s in all, evenly spaced, for ``seconds``:
    a server offered another's rate rather than loaded flat out (a faster server batches more per wake-up, which
    makes its CPU per request lower)."""
    done = 0
    start = time.perf_counter()

    async def worker(i: int) -> None:
        nonlocal done
        k = 0
        while True:
            due = start + (k * concurrency + i) / rate
            now = time.perf_counter()
            if now - start >= seconds:
                return
            if due > now:
                await asyncio.sleep(due - now)  # the pacing itself, not a synchronisation
            await timed(session, url, BODY, headers)
            done += 1
            k += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    return sum(psutil.Process(pid).cpu_times()[:2])


async def loaded_cpu(session: aiohttp.ClientSession, url: str, pid: int, concurrency: int, seconds: float,
                     headers: dict[str, str] | None = None) -> tuple[float, float]:
    """(requests/s, CPU seconds per request of process ``pid``) while ``throughput`` loads ``url``."""
    before = cpu_seconds(pid)
    rps = await throughput(session, url, concurrency, seconds, headers)
    return rps, (cpu_seconds(pid) - before) / (rps * seconds)


@contextlib.contextmanager
def _listening(argv: list[str], port: int, what: str) -> Iterator[int]:
    """The process ``argv`` until the block ends, once it listens on ``port``; yields its pid."""
    proc = subprocess.Popen(argv)
    try:
        wait_listening(port, proc, what)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def minimal_app() -> Iterator[tuple[str, int]]:
    """MINIMAL_AIOHTTP_APP in its own process; yields (its completions URL, its pid)."""
    port = free_port()
    with _listening([sys.executable, "-c", MINIMAL_AIOHTTP_APP, str(port)], port, "the minimal aiohttp app") as pid:
        yield f"http://127.0.0.1:{port}/v1/completions", pid


@contextlib.contextmanager
def minimal_proxy(upstream_port: int) -> Iterator[tuple[str, int]]:
    """``_minimal_proxy.py`` in front of the runtime at ``upstream_port``; yields (its base URL, its pid)."""
    port = free_port()
    script = str(Path(__file__).with_name("_minimal_proxy.py"))
    with _listening([sys.executable, script, str(port), str(upstream_port)], port, "the minimal proxy") as pid:
        yield f"http://127.0.0.1:{port}", pid


async def minimal_app_cpu(session: aiohttp.ClientSession, args: argparse.Namespace) -> float:
    """CPU seconds per request of MINIMAL_AIOHTTP_APP under the same load."""
    with minimal_app() as (url, pid):
        await timed(session, url, BODY)
        return (await loaded_cpu(session, url, pid, args.concurrency, args.seconds))[1]


async def stream_rate(session: aiohttp.ClientSession, url: str, tokens: int) -> float:
    body = {**BODY, "max_tokens": tokens, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    received = 0
    async with session.post(url, json=body) as resp:
        async for _ in resp.content.iter_any():
            received += 1
    return tokens / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    preset = f"{{ctxSize: 2048, parallel: {args.concurrency}, threads: {args.runtime_threads}}}"
    with tempfile.TemporaryDirectory() as tmp, gateway(Path(tmp), preset) as served:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            proxied = served.url + "/v1/completions"
            await timed(session, proxied, BODY)  # starts m1
            status = await admin_status(session, served.url)
            direct = f"http://127.0.0.1:{status['instances']['m1']['port']}/v1/completions"
            # The runtime answers the holder of its start's secret alone (the gateway drops a client's own).
            secret = (served.home / "run" / "m1.key").read_text().strip()
            session.headers["Authorization"] = f"Bearer {secret}"
            for _ in range(20):  # warm both paths
                await timed(session, direct, BODY)
                await timed(session, proxied, BODY)
            d50, p50 = await latency(session, direct, proxied, args.requests)
            d_rounds, p_rounds, cpu_per_request = [], [], []
            for _ in range(args.rounds):
                d_rounds.append(await throughput(session, direct, args.concurrency, args.seconds))
                rps, cpu = await loaded_cpu(session, proxied, status["pid"], args.concurrency, args.seconds)
                p_rounds.append(rps)
                cpu_per_request.append(cpu)
            d_rps, p_rps = statistics.median(d_rounds), statistics.median(p_rounds)
            floor = await minimal_app_cpu(session, args)
            d_streams, p_streams = [], []
            for _ in range(args.rounds):
                d_streams.append(await stream_rate(session, direct, args.tokens))
                p_streams.append(await stream_rate(session, proxied, args.tokens))
            d_stream, p_stream = statistics.median(d_streams), statistics.median(p_streams)
            # Swap: m2 through the gateway (stop m1, start m2, probe) against m2's own start measured by the
            # controller (its "ready in X s" message).
            started = time.perf_counter()
            await timed(session, proxied, {**BODY, "model": "m2"})
            swap = time.perf_counter() - started
            message = (await admin_status(session, served.url))["instances"]["m2"]["message"]
            runtime_start = float(message.split("ready in ")[1].split(" s")[0])
    print(f"latency p50: direct {d50 * 1000:.2f} ms, proxied {p50 * 1000:.2f} ms, "
          f"added {(p50 - d50) * 1000:.2f} ms (target <= 0.5 ms)")
    print(f"requests/s at concurrency {args.concurrency}: direct {d_rps:.0f}, proxied {p_rps:.0f}, "
          f"ratio {p_rps / d_rps:.2f}x (target >= 0.85x; rounds {' '.join(f'{p / d:.2f}' for d, p in zip(d_rounds, p_rounds))})")
    print(f"gateway CPU per proxied request: {statistics.median(cpu_per_request) * 1e6:.0f} us (user + system); "
          f"a minimal aiohttp app answering a fixed body: {floor * 1e6:.0f} us")
    print(f"streaming {args.tokens} tokens: direct {d_stream:.0f} tok/s, proxied {p_stream:.0f} tok/s, "
          f"ratio {p_stream / d_stream:.2f}x (target >= 0.99x)")
    print(f"swap m1 -> m2: {swap * 1000:.0f} ms, runtime's own start {runtime_start * 1000:.0f} ms, "
          f"overhead {(swap - runtime_start) * 1000:.0f} ms (target <= 100 ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime-threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=400)
    asyncio.run(main(parser.parse_args()))
