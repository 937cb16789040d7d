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
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fixtures.tiny_models import write_tiny_llama_gguf  # noqa: E402

ATHANOR = str(Path(sys.executable).parent / "athanor")
SLACK_S = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        root = Path(tmp)
        home = root / "home"
        env = {**os.environ, "ATHANOR_HOME": str(home), "HF_HUB_CACHE": str(root / "hub")}
        specs = []
        for name in ("m1", "m2"):
            gguf = write_tiny_llama_gguf(root / f"{name}.gguf", context_length=2048, name=name)
            specs.append(f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\n"
                         f"spec:\n  runtime: llama-server\n  source: {{path: {json.dumps(str(gguf))}}}\n"
                         f"  preset: {{ctxSize: 2048, threads: 1}}\n")
        subprocess.run([ATHANOR, "apply", "-f", "-"], input="---\n".join(specs), text=True, env=env, check=True,
                       capture_output=True)
        port = free_port()
        daemon = subprocess.Popen([ATHANOR, "serve", "--listen", f"127.0.0.1:{port}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)  # polling while the gateway starts
            latencies: list[float] = []
            started = time.perf_counter()
            await asyncio.gather(*(client(url, args.rounds, i % 2, latencies) for i in range(args.clients)))
            elapsed = time.perf_counter() - started
        finally:
            subprocess.run([ATHANOR, "down"], env=env, capture_output=True)
            daemon.wait(30)
        loads = load_times(home)  # read after the shutdown, which writes every pending event
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
