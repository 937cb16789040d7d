"""The gateway's work per proxied request, in-process: no sockets, no wake-ups, no other process in between.

    .venv/bin/python benchmarks/request_path.py [--requests 20000] [--rounds 7] [--profile] [--callgrind]

A real controller serves a tiny GGUF on a real llama-server, started by one request through the real front door.
Then the front door gets a client connection and the pool a connection to the runtime whose transports only
record what is written, and each round feeds one request (as aiohttp sends it) into the front door and the
runtime's real answer (captured once) into the pool's connection, ``--requests`` times: everything the daemon's
event loop runs for a proxied request, parsing both ways, the guard, the admission, the lease, the model-id
rewrite, usage, metrics and the telemetry record, and nothing else.

The baseline in the same run is ``_minimal_proxy.py`` driven the same way: llhttp both ways and nothing else, the
least a Python proxy on this stack does. Printed: microseconds per request (the best round: the timed benchmarks
measure everything else) and the ratio to the baseline. ``--callgrind`` runs it all again under valgrind and
prints instructions per request, a figure that moves with the code and not with the machine (collection is on
only around the rounds). ``--profile`` prints cProfile's busiest functions of the gateway's path (Python's only:
run it with ``ATHANOR_COMPILED=0`` to see the compiled modules' functions, as Python).

Why: on a shared 2-core machine the timed figures move 10-20% between rounds, so a change of a few percent in the
request path cannot be seen there; this measures the path alone. What it cannot show: system calls and the cost
of a cold cache after each wake-up, which the live gateway pays on top (see "The hot path" in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _minimal_proxy
from _gateway import ATHANOR, sweep, tiny_models
from fixtures.transports import KeptTransport

BODY = b'{"model": "m1", "prompt": "hi", "max_tokens": 1, "temperature": 0}'
REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
           b"User-Agent: Python/3.11 aiohttp/3.9.5\r\nContent-Length: %d\r\nContent-Type: application/json\r\n\r\n%b")
WARM = 2000  # requests before the rounds (caches, the pool's and the guard's memos)


def collecting(on: bool) -> None:
    """Callgrind's collection on or off (when this process runs under it: ``--callgrind``)."""
    if os.environ.get("REQUEST_PATH_CALLGRIND"):
        action = ["-i", "on"] if on else ["-i", "off"]
        subprocess.run(["callgrind_control", *action, str(os.getpid())], check=True, capture_output=True)
        if not on:
            subprocess.run(["callgrind_control", "-d", str(os.getpid())], check=True, capture_output=True)


def rounds(one: Callable[[], None], requests: int, count: int, written: list[list[bytes]]) -> list[float]:
    """Microseconds per request of each round of ``requests`` calls of ``one``."""
    for _ in range(WARM):
        one()
    per_request = []
    collecting(True)
    for _ in range(count):
        for out in written:
            out.clear()
        started = time.perf_counter()
        for _ in range(requests):
            one()
        per_request.append((time.perf_counter() - started) / requests * 1e6)
    collecting(False)
    return per_request


def minimal_proxy(answer: bytes) -> tuple[Callable[[], None], list[list[bytes]], Callable[[], bytes]]:
    """The baseline: ``_minimal_proxy``'s protocols with recording transports."""
    idle: list[_minimal_proxy.Upstream] = []
    upstream = _minimal_proxy.Upstream(idle)
    upstream.connection_made(KeptTransport())  # type: ignore[arg-type]
    idle.append(upstream)
    client = _minimal_proxy.Client(0, idle)
    client_transport = KeptTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    request = REQUEST % (8080, len(BODY), BODY)

    def one() -> None:
        client.data_received(request)
        upstream.data_received(answer)

    return one, [client_transport.written, upstream.transport.written], lambda: client_transport.written[-1]


async def measure(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from athanor.controller.controller import Controller
    from athanor.controller.readiness import probe_session
    from athanor.ingress.app import PROXY, create_app, front_door
    from athanor.ingress.protocol import GatewayRunner
    from athanor.ingress.upstream import UpstreamPool, _Connection
    from athanor.managers import Managers
    from athanor.store import Store
    from athanor.telemetry import db as telemetry_db
    from athanor.telemetry.recorder import Recorder, retention_of

    store = Store(root / "home")
    async with probe_session() as session:
        controller = Controller(store, Managers(store.home), session)
        controller.start_monitor()
        pool = UpstreamPool()
        app = create_app(controller, pool, "127.0.0.1")
        recorder = app[PROXY].telemetry = Recorder(telemetry_db.path_in(store.home),
                                                   lambda: retention_of(controller.gateway()))
        await recorder.open()
        runner = GatewayRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                               handler_cancellation=True)
        await runner.setup()
        front = front_door(app, runner.relayed)
        server = await asyncio.get_running_loop().create_server(front, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = REQUEST % (port, len(BODY), BODY)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # starts the runtime
            writer.write(request)
            first = await asyncio.wait_for(reader.read(65536), 120)
            writer.close()
            if b" 200 " not in first.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"the first request was not answered 200: {first[:300]!r}")
            (_, runtime), = pool._runtimes.items()
            answer = await runtime_answer(runtime, (store.home / "run" / "m1.key").read_text().strip())
            for connection in runtime.idle:
                connection.close()
            runtime.idle.clear()
            runtime.open = 1
            upstream = _Connection(runtime)
            upstream_transport = KeptTransport()
            upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
            upstream.idle_since = float("inf")  # never too old to reuse: the runtime never sees this connection
            runtime.idle.append(upstream)
            client = front()
            client_transport = KeptTransport()
            client.connection_made(client_transport)  # type: ignore[arg-type]

            def one() -> None:
                client.data_received(request)
                upstream.data_received(answer)

            written = [client_transport.written, upstream_transport.written]
            if args.profile:
                for _ in range(WARM):
                    one()
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(args.requests):
                    one()
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            athanor = rounds(one, args.requests, args.rounds, written)
            answered = client_transport.written[-1]
            if not answered.startswith(b"HTTP/1.1 200") or client_transport.closed or upstream_transport.closed:
                raise RuntimeError(f"the gateway answered {answered[:200]!r} (connections closed: "
                                   f"{client_transport.closed}, {upstream_transport.closed})")
            baseline_one, baseline_written, baseline_answer = minimal_proxy(answer)
            baseline = rounds(baseline_one, args.requests, args.rounds, baseline_written)
            if not baseline_answer().startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the minimal proxy answered {baseline_answer()[:200]!r}")
            return {"athanor": athanor, "minimal": baseline}
        finally:
            server.close()
            front.close()
            await runner.cleanup()
            pool.close()
            await recorder.close()
            await controller.close()  # stops the runtime


async def runtime_answer(runtime: Any, key: str) -> bytes:
    """The runtime's whole answer to the benchmark's request, as it sends it, over the connection the pool uses."""
    if runtime.socket:
        reader, writer = await asyncio.open_unix_connection(runtime.socket)
    else:
        reader, writer = await asyncio.open_connection(*runtime.address)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %b\r\nContent-Length: %d\r\n\r\n%b" % (key.encode(), len(BODY), BODY))
    await writer.drain()
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < content_length(answer):
        chunk = await asyncio.wait_for(reader.read(65536), 30)
        if not chunk:
            raise RuntimeError(f"the runtime closed the connection: {answer[:300]!r}")
        answer += chunk
    writer.close()
    return answer


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise RuntimeError(f"no Content-Length in the runtime's answer: {head[:300]!r}")


def run_here(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    with tempfile.TemporaryDirectory(prefix="athanor-request-path-") as tmp:
        root = Path(tmp)
        env = {"ATHANOR_HOME": str(root / "home"), "HF_HUB_CACHE": str(root / "hub")}
        gguf, = tiny_models(root / "models", ("m1",))
        spec = (f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: m1}}\nspec:\n"
                f"  runtime: llama-server\n  source: {{path: {json.dumps(str(gguf))}}}\n"
                f"  preset: {{ctxSize: 2048, parallel: 8, threads: 1}}\n")
        subprocess.run([ATHANOR, "apply", "-f", "-"], input=spec, text=True, env={**os.environ, **env}, check=True,
                       capture_output=True)
        os.environ.update(env)
        try:
            return uvloop.run(measure(root, args))
        finally:
            leftovers = sweep(root)  # a runtime that outlived a failed run
            if leftovers:
                print(f"killed processes left running: {leftovers}", file=sys.stderr)


def instructions(args: argparse.Namespace) -> dict[str, float]:
    """Instructions per request of each side, this script run again under callgrind."""
    with tempfile.TemporaryDirectory(prefix="athanor-callgrind-") as tmp:
        out = Path(tmp) / "cg.out"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                   sys.executable, __file__, "--requests", str(args.requests), "--rounds", "1"]
        try:
            subprocess.run(command, check=True, capture_output=True,
                           env={**os.environ, "REQUEST_PATH_CALLGRIND": "1"})
        except subprocess.CalledProcessError as exc:
            detail = exc.stderr.decode(errors="replace")[-2000:]
            raise SystemExit(f"the run under callgrind failed:\n{detail}") from None
        totals = []
        for part in (1, 2):  # one dump after each side's rounds
            text = Path(f"{out}.{part}").read_text()
            totals.append(int(next(line for line in text.splitlines() if line.startswith("totals:")).split()[1]))
    return {"athanor": totals[0] / args.requests, "minimal": totals[1] / args.requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="print cProfile's busiest functions first")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions under valgrind")
    args = parser.parse_args()
    result = run_here(args)
    if os.environ.get("REQUEST_PATH_CALLGRIND"):
        return
    athanor, minimal = min(result["athanor"]), min(result["minimal"])
    from athanor.ingress import HOT_PATH

    print(f"per proxied request, in-process, best of {args.rounds} rounds of {args.requests} "
          f"(the hot path: {HOT_PATH.reason}):")
    print(f"  athanor        {athanor:7.1f} us  (rounds {' '.join(f'{x:.1f}' for x in result['athanor'])})")
    print(f"  minimal proxy  {minimal:7.1f} us  (rounds {' '.join(f'{x:.1f}' for x in result['minimal'])})")
    print(f"  athanor / minimal proxy: {athanor / minimal:.2f}x")
    if args.callgrind:
        counted = instructions(argparse.Namespace(requests=5000))
        print(f"instructions per request (callgrind): athanor {counted['athanor'] / 1000:.1f}k, minimal proxy "
              f"{counted['minimal'] / 1000:.1f}k, {counted['athanor'] / counted['minimal']:.2f}x")


if __name__ == "__main__":
    main()
