"""The control plane's own costs: the CLI's wall time, a scan of a large cache, a large apply, the daemon's RSS.

Each figure runs the real console script (``.venv/bin/athanor``) in a subprocess under a private ATHANOR_HOME,
as a user would, so Python's start-up and the imports of the command are in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import aiohttp
import psutil
from _gateway import ATHANOR, gateway
from _streams import body

from fixtures.tiny_models import make_hf_cache, write_tiny_llama_gguf

MIB = 2**20


def athanor_env(home: Path, hub: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "ATHANOR_HOME": str(home)}
    if hub is not None:
        env["HF_HUB_CACHE"] = str(hub)
    return env


def timed_cli(argv: list[str], env: dict[str, str], stdin: str | None = None) -> tuple[float, str]:
    """Wall seconds of one ``athanor ...`` run and its output; RuntimeError when it fails."""
    started = time.perf_counter()
    done = subprocess.run([ATHANOR, *argv], env=env, input=stdin, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"athanor {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed, done.stdout


def model_names(env: dict[str, str]) -> list[str]:
    return timed_cli(["get", "models", "-o", "name"], env)[1].split()


def get_models(env: dict[str, str], times: int) -> list[float]:
    """Wall seconds of ``athanor get models`` (a table, the daemon's live status included when one runs)."""
    return [timed_cli(["get", "models"], env)[0] for _ in range(times)]


def generated_cache(root: Path, repos: int) -> Path:
    """A Hugging Face cache under ``root`` with ``repos`` GGUF repos (``bench/tiny-NNNN-GGUF``), each holding a
    README and a tiny GGUF; the GGUFs are hard links of one file, so a thousand repos cost one file's space."""
    gguf = write_tiny_llama_gguf(root / "tiny.gguf", context_length=2048, name="tiny")

    def link(path: Path) -> None:
        os.link(gguf, path)

    return make_hf_cache(root, {f"bench/tiny-{i:04d}-GGUF": {"tiny-F32.gguf": link,
                                                              "README.md": f"# tiny {i}\n".encode()}
                                for i in range(repos)})


def scan(hub: Path, home: Path, repos: int) -> float:
    """Wall seconds of ``athanor scan`` registering every repo of ``hub`` in ``home``, empty but for a Gateway
    whose port range has room for them all (applied first, not timed)."""
    env = athanor_env(home, hub)
    no_cache = athanor_env(home, home.parent / f"{home.name}-no-cache")  # apply syncs discovery too: not yet
    timed_cli(["apply", "-f", "-"], no_cache, stdin="apiVersion: athanor.dev/v1alpha1\nkind: Gateway\n"
              f"metadata: {{name: default}}\nspec: {{portRange: {{start: 30000, end: {30000 + 2 * repos}}}}}\n")
    elapsed, _ = timed_cli(["scan"], env)
    found = len(model_names(env))
    if found != repos:
        raise RuntimeError(f"athanor scan registered {found} models of {repos} repos")
    return elapsed


def model_spec(gguf: Path, models: int) -> str:
    """``models`` Model documents on ``gguf``, each with a preset of its own (a multi-document YAML stream)."""
    return "---\n".join(
        f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: bench-{i:03d}, labels: {{suite: bench}}}}\n"
        f"spec:\n  runtime: llama-server\n  source: {{path: {json.dumps(str(gguf))}}}\n"
        f"  preset: {{ctxSize: {1024 + i}, threads: 1}}\n" for i in range(models))


def apply(spec: Path, home: Path, models: int) -> float:
    """Wall seconds of ``athanor apply -f SPEC`` creating ``models`` models in the empty ``home``."""
    env = athanor_env(home)
    elapsed, _ = timed_cli(["apply", "-f", str(spec)], env)
    found = len(model_names(env))
    if found != models:
        raise RuntimeError(f"athanor apply created {found} models of {models}")
    return elapsed


async def _admin_status(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/athanor/v1/status") as resp:
        return await resp.json()


async def _held_stream(session: aiohttp.ClientSession, url: str, request: dict[str, object],
                       counter: list[int], opened: asyncio.Event, release: asyncio.Event) -> None:
    """A stream read up to its first token, then drained (so the runtime never blocks on it) until ``release``
    closes it mid-stream; ``counter[0]`` counts the streams that have their first token."""
    async with session.post(url + "/v1/completions", json=request) as resp:
        if resp.status != 200:
            raise RuntimeError(f"a held stream was answered {resp.status}: {(await resp.read())[:300]!r}")
        async for line in resp.content:
            if line.startswith(b"data: {"):
                break
        counter[0] += 1
        if counter[0] == counter[1]:
            opened.set()
        reader = asyncio.ensure_future(resp.content.read())
        await release.wait()
        reader.cancel()
        resp.close()


async def _status(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/athanor/v1/status") as resp:
        return await resp.json()


async def _until_phase(session: aiohttp.ClientSession, url: str, model: str, phase: str) -> dict:
    deadline = time.monotonic() + 60
    while (status := await _status(session, url))["instances"][model]["phase"] != phase:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{model} not {phase} within 60 s: {status['instances'][model]}")
        await asyncio.sleep(0.05)  # polling the admin API for a phase, with a deadline
    return status


async def rss_with_streams(url: str, home: Path, model: str, streams: int, tokens: int) -> dict[str, float]:
    """The daemon's RSS idle and with ``streams`` streams open at once.

    Idle: after one request served, ``model`` unloaded again (``athanor unload``), nothing in flight. Then the
    streams are sent together: they wait for the model's start in the gateway's queue (its limit raised above
    ``streams``), so the runtime takes them in one batch and all are under way at the same time. RSS is read
    once every stream has its first token, and the same moment is checked: the admin status counts ``streams``
    in flight and the runtime's own slot list shows ``streams`` slots processing."""
    env = athanor_env(home)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with session.post(url + "/v1/completions",
                                json={"model": model, "prompt": "hi", "max_tokens": 1}) as resp:
            await resp.read()  # the first load, and the code paths of a served request
        timed_cli(["unload", model], env)
        daemon = psutil.Process((await _until_phase(session, url, model, "Standby"))["pid"])
        idle = daemon.memory_info().rss
        counter = [0, streams]
        opened, release = asyncio.Event(), asyncio.Event()
        held = [asyncio.ensure_future(_held_stream(session, url, body(model, tokens), counter, opened, release))
                for _ in range(streams)]
        try:
            waiter = asyncio.ensure_future(opened.wait())
            done, _ = await asyncio.wait([waiter, *held], return_when=asyncio.FIRST_COMPLETED, timeout=120)
            for task in done:
                task.result()  # a held stream that failed raises here
            if not opened.is_set():
                raise RuntimeError(f"only {counter[0]} of {streams} streams had a token within 120 s")
            open_rss = daemon.memory_info().rss
            status = await _status(session, url)
            inflight = status["instances"][model]["inflight"]
            secret = (home / "run" / f"{model}.key").read_text().strip()
            slots_url = f"http://127.0.0.1:{status['instances'][model]['port']}/slots"
            async with session.get(slots_url, headers={"Authorization": f"Bearer {secret}"}) as resp:
                processing = sum(1 for slot in await resp.json() if slot.get("is_processing"))
            if inflight != streams or processing != streams:
                raise RuntimeError(f"{streams} streams held, but the gateway counts {inflight} in flight and the "
                                   f"runtime {processing} slots processing (streams too short to measure?)")
        finally:
            release.set()
            await asyncio.gather(*held, return_exceptions=True)
    return {"idle_mib": idle / MIB, "open_mib": open_rss / MIB, "per_stream_kib": (open_rss - idle) / streams / 1024}


async def rss_round(root: Path, streams: int, tokens: int, ports: tuple[int, int]) -> dict[str, float]:
    """A fresh daemon under ``root`` with one model of ``streams`` slots and the queue limit raised to match;
    ``rss_with_streams`` on it."""
    preset = f"{{ctxSize: {streams * (tokens + 16)}, parallel: {streams}, threads: 1}}"
    spec = (f"{{serviceManager: process, limits: {{maxQueue: {streams * 2}}}, "
            f"portRange: {{start: {ports[0]}, end: {ports[1]}}}}}")
    with gateway(root, preset, ("held",), gateway_spec=spec) as served:
        return await rss_with_streams(served.url, served.home, "held", streams, tokens)
