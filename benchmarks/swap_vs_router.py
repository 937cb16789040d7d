"""Swap speed: athanor's gateway against llama.cpp's router mode, same binary, same tiny GGUFs, in the same run.

    .venv/bin/python benchmarks/swap_vs_router.py [--rounds 5] [--swaps 6] [--weights GGUF] [--router-args ARGS]
        [--json PATH]

Both sides serve the same two tiny GGUF models, one at a time, from the llama-server athanor itself runs:
- athanor: ``athanor serve`` with the embedded supervisor and ``single`` residency, each model with the preset
  ``{ctxSize: 2048, threads: 1}`` (as the other benchmarks);
- the router: ``llama-server --models-dir DIR --models-max 1 -c 2048 -t 1``, which names a model by its file stem.

athanor starts each instance with llama-server's fit pass off (``LLAMA_ARG_FIT=off``: with the context and GPU
layers given it measures and changes nothing); the router leaves it on, as llama-server does unless told.
``--router-args '--fit off'`` gives the router's instances the same, to compare the two on equal loads.
``--weights GGUF`` swaps between two names for one real GGUF instead (both sides read the same file), where the
load is the model's rather than llama-server's own start.

A client-seen swap is the wall time of a 1-token, temperature 0 chat completion naming the model that is not
loaded: the request stops one runtime and starts the other. Each round loads m1 first (not timed: the first load
of a round may be cold), then times ``--swaps`` requests alternating m2, m1, m2, ... on one keep-alive connection.
Rounds alternate between the two sides, and which side goes first, so drift in machine load hits both alike.
Prints each side's median swap with min-max of the round medians, the mean and 90th percentile of every swap,
the ratio athanor/router of the medians and the target (athanor <= router). ``--json`` saves the figures and the
two command lines.

Every process started here is stopped at the end, on failure and on Ctrl-C or SIGTERM too: the gateway with
``athanor down`` (which stops its runtimes), the router by signalling its process group (its model instances are
its children and also exit when their stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from _gateway import free_port, gateway, stop_group, tiny_models, wait_answering

from athanor.runtimes.launch import find_runtime

MODELS = ("m1", "m2")
PRESET = "{ctxSize: 2048, threads: 1}"
ROUTER_ARGS = ("-c", "2048", "-t", "1")  # the same as PRESET, in llama-server's flags
# Runtime ports of this run's own, away from the default range that other gateways on the machine use.
PORTS = 20000 + os.getpid() % 70 * 100
GATEWAY_SPEC = (f"{{serviceManager: process, residency: {{policy: single}}, "
                f"portRange: {{start: {PORTS}, end: {PORTS + 99}}}}}")


@contextlib.contextmanager
def router(binary: str, models_dir: Path, log_path: Path, args: tuple[str, ...] = ROUTER_ARGS) -> Iterator[str]:
    """llama.cpp's router serving the GGUFs in ``models_dir``, one loaded at a time, each instance with the
    llama-server flags ``args``; yields its URL."""
    port = free_port()
    argv = [binary, "--models-dir", str(models_dir), "--models-max", "1", "--host", "127.0.0.1",
            "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_answering(url + "/health", proc, "the router")
        yield url
    finally:
        stop_group(proc)  # the group: model instances that outlived the router too


async def chat(session: aiohttp.ClientSession, url: str, model: str) -> float:
    """Seconds for one 1-token completion naming ``model``, as the client sees it."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        text = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status} for {model}: {text[:300]!r}")
    return time.perf_counter() - started


async def round_of_swaps(session: aiohttp.ClientSession, url: str, swaps: int,
                         models: tuple[str, str] = MODELS) -> list[float]:
    await chat(session, url, models[0])  # the first loaded (from cold, or a swap back): not timed
    return [await chat(session, url, models[(i + 1) % 2]) for i in range(swaps)]


def summary(rounds: list[list[float]]) -> dict[str, float]:
    """The target's figure, the median of the round medians (with their min-max), and what a client waits on
    average and one time in ten: the router's swaps are bimodal, and a median hides its slow ones."""
    medians = [statistics.median(r) for r in rounds]
    every = sorted(t for r in rounds for t in r)
    return {"median_ms": statistics.median(medians) * 1000, "min_ms": min(medians) * 1000,
            "max_ms": max(medians) * 1000, "all_median_ms": statistics.median(every) * 1000,
            "mean_ms": statistics.mean(every) * 1000, "p90_ms": every[int(0.9 * (len(every) - 1))] * 1000}


def athanor_argv(home: Path, model: str = MODELS[0]) -> str:
    """The runtime's command line as athanor started it (the last start line of ``model``'s log)."""
    lines = (home / "logs" / f"{model}.log").read_text(errors="replace").splitlines()
    return [line for line in lines if line.startswith("=== ") and " starting: " in line][-1].split(" starting: ")[1]


async def main(args: argparse.Namespace) -> dict[str, object]:
    binary = find_runtime("llama-server")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        router_dir = root / "router"
        models, weights = MODELS, {}
        if args.weights:  # the same real GGUF twice, under two names, for both sides
            models = ("w1", "w2")
            (router_dir / "models").mkdir(parents=True)
            for name in models:
                (router_dir / "models" / f"{name}.gguf").symlink_to(args.weights.resolve())
                weights[name] = (router_dir / "models" / f"{name}.gguf", PRESET)
        else:
            tiny_models(router_dir / "models", MODELS)
        with gateway(root / "athanor", PRESET, MODELS, gateway_spec=GATEWAY_SPEC, extra_models=weights) as served, \
                router(binary, router_dir / "models", router_dir / "router.log",
                       ROUTER_ARGS + tuple(shlex.split(args.router_args))) as router_url:
            urls = {"athanor": served.url, "router": router_url}
            rounds: dict[str, list[list[float]]] = {side: [] for side in urls}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
                for side in urls:  # the first cold loads of both, not timed
                    await chat(session, urls[side], models[0])
                for n in range(args.rounds):
                    order = list(urls) if n % 2 == 0 else list(reversed(urls))
                    for side in order:
                        rounds[side].append(await round_of_swaps(session, urls[side], args.swaps, models))
                    print(f"round {n + 1}: " + ", ".join(
                        f"{side} {statistics.median(rounds[side][-1]) * 1000:.1f} ms" for side in urls), flush=True)
                async with session.get(router_url + "/v1/models") as resp:
                    listed = (await resp.json())["data"]
            argv = {"athanor": athanor_argv(served.home, models[0]),
                    "router": " ".join(next(m for m in listed if m["id"] == models[0])["status"]["args"])}
    result = {side: summary(r) for side, r in rounds.items()}
    ratio = result["athanor"]["median_ms"] / result["router"]["median_ms"]
    report = {"binary": binary, "weights": str(args.weights or "tiny GGUFs"), "rounds": args.rounds,
              "swaps_per_round": args.swaps, "sides": result,
              "ratio_athanor_router": ratio, "target": "athanor <= router", "pass": ratio <= 1.0,
              "raw_ms": {side: [[t * 1000 for t in r] for r in rs] for side, rs in rounds.items()},
              "runtime_argv": argv}
    for side, figures in result.items():
        print(f"{side:8} swap median {figures['median_ms']:6.1f} ms "
              f"(round medians {figures['min_ms']:.1f}-{figures['max_ms']:.1f} ms); "
              f"every swap: mean {figures['mean_ms']:.1f} ms, p90 {figures['p90_ms']:.1f} ms")
    print(f"ratio athanor/router {ratio:.2f}x (target <= 1.00x): {'pass' if ratio <= 1.0 else 'MISS'}")
    return report


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every finally block stops what it started


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--swaps", type=int, default=6, help="timed swaps per round (m2, m1, m2, ...)")
    parser.add_argument("--router-args", default="",
                        help="more llama-server flags for the router's instances, e.g. '--fit off': athanor turns "
                             "llama-server's fit pass off where it cannot change anything; the router leaves it on")
    parser.add_argument("--weights", type=Path,
                        help="swap between two names for this real GGUF instead of the tiny GGUFs (e.g. SmolLM2)")
    parser.add_argument("--json", type=Path, help="save the figures here")
    arguments = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    figures = asyncio.run(main(arguments))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")
