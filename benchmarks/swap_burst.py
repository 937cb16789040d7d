"""Swap bursts: many clients alternating between two models under `single` residency.

    .venv/bin/python benchmarks/swap_burst.py [--clients 32] [--rounds 4]

Every client alternates m1, m2, m1, ... on its own keep-alive connection, so each swap meets a burst of requests
the moment the new runtime is ready. A request should wait for at most the two loads in its way (the model
being swapped out may have to come back for it) plus a little: the baseline, measured in the same run, is the
runtimes' own load time as the controller records it ("ready in X s"). Prints p50, p99 and the slowest request,
and the slowest as a ratio of that bound (target <= 1.0).

The stall this guards against: a runtime that has just started accepts a burst of new connections faster than
its HTTP thread pool grows, and connections beyond its fixed threads wait for a kept-alive one to time out (5 s
in llama-server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from _gateway import gateway

SLACK_S = 0.1


async def client(url: str, rounds: int, first: int, latencies: list[float]) -> None:
    async with aiohttp.ClientSession() as session:  # one keep-alive connection per client, as an SDK keeps
        for i in range(rounds * 2):
            model = ("m1", "m2")[(first + i) % 2]
            body = {"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0}
            started = time.perf_counter()
            async with session.post(url, json=body) as resp:
                await resp.read()
                assert resp.status == 200, (resp.status, await resp.text())
            latencies.append(time.perf_counter() - started)


def load_times(home: Path) -> list[float]:
    """Every load's duration, from the controller's "ready in X s" events."""
    events = json.loads((home / "state.json").read_text())["events"]
    return [float(m.group(1)) for e in events if (m := re.search(r"ready in ([0-9.]+) s", e["message"]))]


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with gateway(Path(tmp), "{ctxSize: 2048, threads: 1}") as served:
            latencies: list[float] = []
            started = time.perf_counter()
            await asyncio.gather(*(client(served.url + "/v1/completions", args.rounds, i % 2, latencies)
                                   for i in range(args.clients)))
            elapsed = time.perf_counter() - started
        loads = load_times(served.home)  # read after the shutdown, which writes every pending event
    latencies.sort()
    bound = 2 * max(loads) + SLACK_S
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    slow = sum(1 for t in latencies if t > bound)
    print(f"{len(latencies)} requests from {args.clients} clients in {elapsed:.1f} s, {len(loads)} loads "
          f"(median {statistics.median(loads) * 1000:.0f} ms, max {max(loads) * 1000:.0f} ms)")
    print(f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms")
    print(f"slowest against two loads + {SLACK_S * 1000:.0f} ms ({bound * 1000:.0f} ms): "
          f"{latencies[-1] / bound:.2f}x (target <= 1.0); requests over it: {slow}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
