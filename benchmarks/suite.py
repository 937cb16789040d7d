"""The one benchmark command: athanor against its peers, its hot path, streaming and its control plane, in one run.

    .venv/bin/python benchmarks/suite.py [--rounds 5] [--json out.json] [--compare old.json] [--skip-litellm]
                                         [--quick]

Everything runs on this machine over loopback, on the llama-server athanor itself runs and tiny random-weight
GGUFs (runtime ``--threads 1``, 1-token completions), so the runtime's own work is as small as it gets and the
proxies' share as large as it gets. The peers, side by side:
- direct: llama-server started with athanor's own command line for the model (another port, its own key file):
  the limit, and what every ratio is of;
- athanor: ``athanor serve`` (embedded supervisor, ``single`` residency);
- router: llama.cpp's router mode, ``llama-server --models-dir DIR --models-max 1`` with the same flags;
- litellm: LiteLLM's proxy (pinned, in a virtualenv made on first use, see ``_litellm.py``) in front of direct;
  ``--skip-litellm`` leaves it out.

Each round measures, in this order: latency (requests interleaved across the peers, p50 each), requests/s at
concurrency 8 (peers, a minimal aiohttp app and a minimal proxy in a rotating order, each loaded twice for half
the time, the second pass in mirror order, with CPU per request of
athanor's daemon and of those two), the client-seen swap A->B (athanor and the router, rotating), streaming through athanor against direct
(1 stream, several times interleaved with direct, and 64 concurrent streams: tokens/s and time to first token,
on a model with 64 slots), then the control plane (``athanor get models``,
a scan of a generated 1,000-repo HF cache, an apply of a 100-model spec, and a fresh daemon's RSS idle and with
256 open streams). Every figure is the median of the per-round values, with their min-max; ratios are taken per
round, then their median. Rounds alternate the order of the sides so drift in machine load hits all alike. Five
rounds by default: on a shared 2-core machine one round's requests/s ratio moves by about 0.07 (sd) for the same
code, and a median of 3 still moved by 0.045 between runs, enough to pass or miss a target 0.04 away by chance.

Targets: the hot path's from issue 17 (added p50 <= 0.3 ms, req/s at concurrency 8 >= 0.85x direct, gateway CPU
per request <= 2x the minimal aiohttp app's, streaming tokens/s >= 0.99x; the app is also offered athanor's own
req/s, paced, and that ratio is shown beside it without a target: loaded flat out, the app runs at 4-5x athanor's
rate and handles several requests per wake-up). ``_minimal_proxy.py``, the least a Python proxy on athanor's stack
does (in front of direct, loaded with the peers), is shown beside them without a target too: the gateway's CPU
against it is what athanor's own per-request work costs; time to first token added <= 1 ms for
one stream and <= 1.10x direct for 64; the swap no slower than the router's, and athanor no worse than any peer;
the control plane's, with room over what a quiet 2-core machine shows today (in brackets): ``get models``
<= 250 ms, a command that feels instant (0.13-0.18 s), the 1,000-repo scan <= 3 s (1.7-2.2 s), the 100-model apply
<= 1 s (0.4 s), daemon RSS <= 80 MiB idle (53 MiB), <= 64 KiB per open stream (20 KiB) and <= 96 MiB with 256
open. Rows without a target are the inputs of a ratio, shown for reference.

Prints the peer table, then every figure with its target and PASS/MISS. ``--json`` saves the figures, every
round's raw values and the command lines; ``--compare`` prints the deltas against a saved run. Every process
started here is stopped at the end, on failure and on Ctrl-C or SIGTERM too; a last sweep kills anything still
running that names this run's temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from _control_plane import athanor_env, generated_cache, get_models, model_spec, rss_round
from _control_plane import apply as apply_spec
from _control_plane import scan as scan_cache
from _gateway import gateway, sweep
from _litellm import LITELLM_VERSION, litellm_proxy, litellm_venv
from _peers import direct_server, shared_flags
from _report import Row, compare, figures_table, median, rows_json, table
from _streams import body as stream_body
from _streams import Burst, burst, combined
from proxy_overhead import BODY, cpu_seconds, minimal_app, minimal_proxy, paced, throughput, timed
from swap_vs_router import athanor_argv, round_of_swaps, router

from athanor.native import hot_path
from athanor.runtimes.launch import find_runtime
from fixtures.tiny_models import write_tiny_llama_gguf

CONCURRENCY = 8
PEER_PRESET = f"{{ctxSize: 2048, parallel: {CONCURRENCY}, threads: 1}}"
STREAMS = (1, 64)
HELD_STREAMS = 256
REPOS = 1000
SPEC_MODELS = 100
# Runtime ports of this run's own, away from the default range that other gateways on the machine use.
PORTS = 20000 + os.getpid() % 60 * 100
GATEWAY_SPEC = (f"{{serviceManager: process, residency: {{policy: single}}, limits: {{maxQueue: 256}}, "
                f"portRange: {{start: {PORTS}, end: {PORTS + 49}}}}}")
RSS_PORTS = (PORTS + 50, PORTS + 99)


@dataclass
class Side:
    """One thing requests are sent to: a base URL, the headers it needs, the pids whose CPU is counted."""

    url: str
    headers: dict[str, str] | None = None
    pids: list[int] = field(default_factory=list)


def stream_preset(tokens: int) -> str:
    slots = max(STREAMS)
    return f"{{ctxSize: {slots * (tokens + 16)}, parallel: {slots}, threads: 1}}"


def fresh_session() -> aiohttp.ClientSession:
    """A client session of its own for one phase: no keep-alive connection idles across phases (llama-server
    closes one after 5 s idle, and a request racing that close would fail)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300))


def group_cpu(pids: list[int]) -> float:
    """CPU seconds of the processes ``pids`` (not their children: the router's model instances are runtimes)."""
    return sum(cpu_seconds(pid) for pid in pids if psutil.pid_exists(pid))


class Suite:
    """One run: the peers started once, then ``rounds`` rounds of every measure; raw values per figure."""

    def __init__(self, args: argparse.Namespace, root: Path):
        self.args = args
        self.root = root
        self.raw: dict[str, list[float]] = {}
        self.detail: dict[str, list[object]] = {}
        self.meta: dict[str, object] = {}

    def add(self, key: str, value: float) -> None:
        self.raw.setdefault(key, []).append(value)

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the run

    async def run(self) -> None:
        args, root = self.args, self.root
        binary = find_runtime("llama-server")
        self.meta["llama_server"] = binary
        litellm_script = None if args.skip_litellm else litellm_venv()
        s1_gguf = write_tiny_llama_gguf(root / "stream-models" / "s1.gguf", context_length=32768, name="s1")
        self.log(f"preparing the control plane's inputs (a {args.repos:,}-repo HF cache, "
                 f"a {args.spec_models}-model spec)")
        hub = generated_cache(root / "cache", args.repos)
        spec = root / "models-spec.yaml"
        spec.write_text(model_spec(s1_gguf, args.spec_models))
        with contextlib.ExitStack() as stack:
            served = stack.enter_context(gateway(root / "athanor", PEER_PRESET, ("m1", "m2"),
                                                 gateway_spec=GATEWAY_SPEC,
                                                 extra_models={"s1": (s1_gguf, stream_preset(args.stream_tokens))}))
            async with fresh_session() as session:  # each model started once: its command line is in its log
                await timed(session, served.url + "/v1/completions", {**BODY, "model": "s1"})
                await timed(session, served.url + "/v1/completions", BODY)
                daemon_pid = (await self._status(session, served.url))["pid"]
            argv = {name: athanor_argv(served.home, name) for name in ("m1", "s1")}
            flags = shared_flags(argv["m1"])
            self.meta.update({"runtime_argv": argv, "router_flags": flags})
            direct = stack.enter_context(direct_server(binary, root / "athanor" / "models" / "m1.gguf", "m1",
                                                       flags, root / "direct-m1"))
            direct_s1 = stack.enter_context(direct_server(binary, s1_gguf, "s1", shared_flags(argv["s1"]),
                                                          root / "direct-s1"))
            router_url = stack.enter_context(router(binary, root / "athanor" / "models", root / "router.log",
                                                    tuple(flags)))
            router_pid = _listener_pid(router_url)
            sides = {"direct": Side(direct.url, direct.headers, [direct.pid]),
                     "athanor": Side(served.url, None, [daemon_pid]),
                     "router": Side(router_url, None, [router_pid] if router_pid else [])}
            if litellm_script is not None:
                self.meta["litellm"] = LITELLM_VERSION
                self.log("starting LiteLLM's proxy")
                lite_url, lite_proc = stack.enter_context(litellm_proxy(
                    litellm_script, {"m1": (direct.url + "/v1", direct.key)}, root / "litellm"))
                workers = [c.pid for c in psutil.Process(lite_proc.pid).children(recursive=True)]
                sides["litellm"] = Side(lite_url, None, [lite_proc.pid, *workers])
            minimal_url, minimal_pid = stack.enter_context(minimal_app())
            proxy_url, proxy_pid = stack.enter_context(minimal_proxy(int(direct.url.rsplit(":", 1)[1])))
            references = {"minimal": Side(minimal_url, None, [minimal_pid]),
                          "minimal_proxy": Side(proxy_url, direct.headers, [proxy_pid])}
            for n in range(args.rounds):
                await self.phase(n, "peers", self.peers_round(sides, references, n))
                await self.phase(n, "swaps", self.swaps_round({"athanor": served.url, "router": router_url}, n))
                await self.phase(n, "streaming", self.streams_round(Side(direct_s1.url, direct_s1.headers),
                                                                    sides["athanor"], n))
                await self.phase(n, "control plane", self.control_round(served.home, hub, spec, n))
            self.add("failures", len(self.detail.get("failures", [])))

    async def phase(self, n: int, name: str, measure: Coroutine[Any, Any, None]) -> None:
        """Run one phase of round ``n``. A failed request ends the phase's round, not the run: the error is
        recorded (the ``failures`` figure, whose target is none) and the next phase starts."""
        self.log(f"round {n + 1} of {self.args.rounds}: {name}")
        try:
            await measure
        except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.detail.setdefault("failures", []).append(f"round {n + 1}, {name}: {exc}")
            self.log(f"FAILED round {n + 1}, {name}: {exc}")

    async def _status(self, session: aiohttp.ClientSession, url: str) -> dict:
        async with session.get(url + "/athanor/v1/status") as resp:
            return await resp.json()

    # ------------------------------------------------------------------ rounds

    async def peers_round(self, sides: dict[str, Side], references: dict[str, Side], n: int) -> None:
        async with fresh_session() as session:
            await self._peers_round(session, sides, references, n)

    async def _peers_round(self, session: aiohttp.ClientSession, sides: dict[str, Side],
                           references: dict[str, Side], n: int) -> None:
        """``references``: the minimal aiohttp app and the minimal proxy, loaded like the peers (no targets)."""
        args = self.args
        names = list(sides)
        order = names[n % len(names):] + names[:n % len(names)]
        for name in order:  # warm: loads m1 where a swap left m2, fills keep-alive pools
            for _ in range(20):
                await timed(session, sides[name].url + "/v1/completions", BODY, sides[name].headers)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.requests):  # interleaved, so drift in machine load hits every side alike
            for name in order:
                samples[name].append(await timed(session, sides[name].url + "/v1/completions", BODY,
                                                 sides[name].headers))
        p50 = {name: statistics.median(values) * 1000 for name, values in samples.items()}
        for name in names:
            self.add(f"lat.{name}", p50[name])
            self.add(f"added.{name}", p50[name] - p50["direct"])
        loaded = {**sides, **references}
        sequence = (order + list(references)) if n % 2 == 0 else (list(references) + order)
        done = dict.fromkeys(sequence, 0.0)
        cpu = dict.fromkeys(sequence, 0.0)
        half = args.seconds / 2
        # Each side loaded twice for half the time, the second pass in mirror order (A B C, C B A): a drift in the
        # machine's load over the pass (these runs drift by a tenth within a minute) then weighs on every side
        # alike, where one window each at different moments turned it into a difference between sides.
        for passing in (sequence, sequence[::-1]):
            for name in passing:
                side = loaded[name]
                before = group_cpu(side.pids)
                done[name] += await throughput(session, side.url + "/v1/completions", CONCURRENCY, half,
                                               side.headers) * half
                cpu[name] += group_cpu(side.pids) - before
        rps = {name: count / args.seconds for name, count in done.items()}
        for name in sequence:
            if loaded[name].pids and name != "direct":
                self.add(f"cpu.{name}", cpu[name] / done[name] * 1e6)
        for name in names:
            self.add(f"rps.{name}", rps[name])
            self.add(f"ratio.{name}", rps[name] / rps["direct"])
        self.add("rps.minimal", rps["minimal"])
        self.add("cpu_ratio", self.raw["cpu.athanor"][-1] / self.raw["cpu.minimal"][-1])
        self.add("ratio.minimal_proxy", rps["minimal_proxy"] / rps["direct"])
        self.add("cpu_ratio_proxy", self.raw["cpu.athanor"][-1] / self.raw["cpu.minimal_proxy"][-1])
        minimal = references["minimal"]
        # The minimal app again, offered athanor's rate instead of loaded flat out: at 4-5x athanor's rate it
        # handles several requests per wake-up, which the gateway, paced by its runtime, cannot.
        before = group_cpu(minimal.pids)
        rate = await paced(session, minimal.url + "/v1/completions", CONCURRENCY, args.seconds, rps["athanor"])
        self.add("cpu.minimal_paced", (group_cpu(minimal.pids) - before) / (rate * args.seconds) * 1e6)
        self.add("cpu_ratio_paced", self.raw["cpu.athanor"][-1] / self.raw["cpu.minimal_paced"][-1])

    async def swaps_round(self, urls: dict[str, str], n: int) -> None:
        order = list(urls) if n % 2 == 0 else list(reversed(urls))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for side in order:
                swaps = await round_of_swaps(session, urls[side], self.args.swaps)
                self.detail.setdefault(f"swaps_ms.{side}", []).append([t * 1000 for t in swaps])
                self.add(f"swap.{side}", statistics.median(swaps) * 1000)
                self.add(f"swap_mean.{side}", statistics.mean(swaps) * 1000)

    async def streams_round(self, direct: Side, athanor: Side, n: int) -> None:
        async with fresh_session() as session:
            await self._streams_round(session, direct, athanor, n)

    async def _streams_round(self, session: aiohttp.ClientSession, direct: Side, athanor: Side, n: int) -> None:
        request = stream_body("s1", self.args.stream_tokens)
        sides = {"direct": direct, "athanor": athanor}
        for side in sides.values():  # warm: loads s1 in athanor (a swap from m1)
            await burst(session, side.url + "/v1/completions", request, 1, side.headers)
        for streams in STREAMS:
            order = list(sides) if (n + streams) % 2 == 0 else list(reversed(sides))
            runs: dict[str, list[Burst]] = {name: [] for name in sides}
            for _ in range(self.args.single_streams if streams == 1 else 1):  # single streams: interleaved
                for name in order:
                    side = sides[name]
                    runs[name].append(await burst(session, side.url + "/v1/completions", request, streams,
                                                  side.headers))
            result = {name: combined(bursts) for name, bursts in runs.items()}
            key = f"s{streams}"
            for name, figures in result.items():
                self.add(f"{key}.tps.{name}", figures.tokens_per_s)
                self.add(f"{key}.ttft.{name}", figures.ttft_p50 * 1000)
            self.add(f"{key}.ratio", result["athanor"].tokens_per_s / result["direct"].tokens_per_s)
            self.add(f"{key}.ttft_added", (result["athanor"].ttft_p50 - result["direct"].ttft_p50) * 1000)
            self.add(f"{key}.ttft_ratio", result["athanor"].ttft_p50 / result["direct"].ttft_p50)

    async def control_round(self, home: Path, hub: Path, spec: Path, n: int) -> None:
        args = self.args
        self.add("cp.get_models", median(get_models(athanor_env(home), 5)) * 1000)
        self.add("cp.scan", scan_cache(hub, self.root / f"scan-home-{n}", args.repos))
        self.add("cp.apply", apply_spec(spec, self.root / f"apply-home-{n}", args.spec_models))
        rss = await rss_round(self.root / f"rss-{n}", args.held_streams, args.held_tokens, RSS_PORTS)
        self.add("cp.rss_idle", rss["idle_mib"])
        self.add("cp.rss_open", rss["open_mib"])
        self.add("cp.rss_per_stream", rss["per_stream_kib"])

    # ------------------------------------------------------------------ output

    def sections(self) -> list[tuple[str, list[Row]]]:
        peers = ["router", "litellm"] if not self.args.skip_litellm else ["router"]
        hot = [
            Row("added.athanor", "athanor added p50 latency vs direct", "ms", ("<=", 0.3), 3),
            Row("ratio.athanor", f"athanor req/s at concurrency {CONCURRENCY} vs direct", "x", (">=", 0.85)),
            Row("cpu.athanor", "gateway CPU per proxied request", "us", None, 0),
            Row("cpu.minimal", "minimal aiohttp app CPU per request", "us", None, 0),
            Row("cpu_ratio", "gateway CPU vs the minimal aiohttp app", "x", ("<=", 2.0)),
            Row("cpu.minimal_paced", "minimal aiohttp app CPU per request at athanor's req/s", "us", None, 0),
            Row("cpu_ratio_paced", "gateway CPU vs the minimal app at the same req/s", "x", None),
            Row("cpu.minimal_proxy", "minimal proxy CPU per request (uvloop + llhttp, no features)", "us", None, 0),
            Row("cpu_ratio_proxy", "gateway CPU vs the minimal proxy", "x", None),
            Row("ratio.minimal_proxy", f"minimal proxy req/s at concurrency {CONCURRENCY} vs direct", "x", None),
            Row("lat.direct", "direct p50 latency", "ms", None, 3),
            Row("rps.direct", f"direct req/s at concurrency {CONCURRENCY}", "req/s", None, 0),
        ]
        peer_rows = [Row("swap.athanor", "athanor client-seen swap A->B", "ms", ("<=", "swap.router"), 1),
                     Row("swap.router", "router client-seen swap A->B", "ms", None, 1),
                     Row("swap_mean.athanor", "athanor client-seen swap A->B, the mean of a round's", "ms", None, 1),
                     Row("swap_mean.router", "router client-seen swap A->B, the mean of a round's", "ms", None, 1)]
        for peer in peers:
            peer_rows += [
                Row(f"added.{peer}", f"{peer} added p50 latency vs direct", "ms", (">=", "added.athanor"), 3),
                Row(f"ratio.{peer}", f"{peer} req/s at concurrency {CONCURRENCY} vs direct", "x",
                    ("<=", "ratio.athanor")),
                Row(f"cpu.{peer}", f"{peer} CPU per proxied request ({peer} process)", "us", None, 0),
            ]
        streams = []
        for n in STREAMS:
            k = f"s{n}"
            label = f"{n} stream{'s' if n > 1 else ''}"
            streams += [
                Row(f"{k}.ratio", f"streaming tokens/s through athanor vs direct, {label}", "x", (">=", 0.99)),
                Row(f"{k}.tps.direct", f"direct tokens/s, {label}", "tok/s", None, 0),
                Row(f"{k}.ttft.direct", f"direct time to first token p50, {label}", "ms", None, 2),
                Row(f"{k}.ttft.athanor", f"athanor time to first token p50, {label}", "ms", None, 2),
                Row(f"{k}.ttft_added", f"athanor added time to first token, {label}", "ms", ("<=", 1.0), 2)
                if n == 1 else
                Row(f"{k}.ttft_ratio", f"athanor time to first token vs direct, {label}", "x", ("<=", 1.10)),
            ]
        held = self.args.held_streams
        control = [
            Row("failures", "phases ended by a failed request (see 'failed:' lines)", "", ("<=", 0), 0),
            Row("cp.get_models", "`athanor get models` wall time (daemon running)", "ms", ("<=", 250), 0),
            Row("cp.scan", f"`athanor scan` of {self.args.repos:,} generated HF-cache repos", "s", ("<=", 3.0)),
            Row("cp.apply", f"`athanor apply` of a {self.args.spec_models}-model spec", "s", ("<=", 1.0)),
            Row("cp.rss_idle", "daemon RSS idle (a model Ready, nothing in flight)", "MiB", ("<=", 80), 1),
            Row("cp.rss_open", f"daemon RSS with {held} open streams", "MiB", ("<=", 96), 1),
            Row("cp.rss_per_stream", "daemon RSS per open stream", "KiB", ("<=", 64), 1),
        ]
        return [("Hot path: athanor against direct llama-server", hot),
                ("Peers (same binary, same GGUFs; each against athanor)", peer_rows),
                ("Streaming: athanor against direct llama-server", streams),
                ("Control plane", control)]

    def peer_table(self) -> str:
        def cell(key: str, unit: str, digits: int, sign: bool = False) -> str:
            values = self.raw.get(key)
            if not values:
                return "-"
            fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
            mid = fmt.format(median(values))
            return f"{mid} {unit} ({fmt.format(min(values))} to {fmt.format(max(values))})" if len(values) > 1 \
                else f"{mid} {unit}"

        lines = []
        for peer in ["direct", "athanor", "router", "litellm"]:
            if f"lat.{peer}" not in self.raw:
                continue
            added = (f"p50 {median(self.raw['lat.direct']):.3f} ms" if peer == "direct"
                     else cell(f"added.{peer}", "ms", 3, sign=True))
            rps = (f"{median(self.raw['rps.direct']):.0f} req/s" if peer == "direct"
                   else cell(f"ratio.{peer}", "x", 2))
            swap = cell(f"swap.{peer}", "ms", 1) if peer in ("athanor", "router") else "-"
            lines.append([peer, added, rps, swap])
        return table(["peer", "added p50 latency", f"req/s at concurrency {CONCURRENCY} vs direct",
                      "client-seen swap A->B"], lines)

    def report(self) -> dict[str, object]:
        sections = self.sections()
        print("\nPeers: median (min to max over rounds)\n" + self.peer_table())
        print("\n" + figures_table(sections, self.raw))
        figures = rows_json(sections, self.raw)
        for failure in self.detail.get("failures", []):
            print(f"failed: {failure}")
        marks = [f["mark"] for f in figures]
        print(f"\n{marks.count('PASS')} PASS, {marks.count('MISS')} MISS over {self.args.rounds} rounds")
        return {"meta": self.meta, "figures": figures, "raw": self.raw, "detail": self.detail}


def _listener_pid(url: str) -> int | None:
    """The pid listening on ``url``'s port (the router process itself, not its model instances); None where the
    system does not tell (its CPU is then not reported)."""
    port = int(url.rsplit(":", 1)[1])
    try:
        connections = psutil.net_connections("tcp")
    except psutil.AccessDenied:
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            return conn.pid
    return None


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every finally block stops what it started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5; --quick: 2)")
    parser.add_argument("--json", type=Path, help="save the figures and every round's raw values here")
    parser.add_argument("--compare", type=Path, help="print the deltas against a run saved with --json")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter measures (for development)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, homes) afterwards")
    args = parser.parse_args()
    full = {"rounds": 5, "requests": 300, "seconds": 3.0, "swaps": 6, "stream_tokens": 256, "single_streams": 5,
            "held_tokens": 512}
    quick = {"rounds": 2, "requests": 60, "seconds": 1.0, "swaps": 3, "stream_tokens": 128, "single_streams": 3,
             "held_tokens": 512}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.repos, args.spec_models, args.held_streams = REPOS, SPEC_MODELS, HELD_STREAMS
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    with contextlib.ExitStack() as cleanup:
        if args.keep:
            root = Path(tempfile.mkdtemp(prefix="athanor-bench-"))
            print(f"working directory (kept): {root}", file=sys.stderr)
        else:
            root = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="athanor-bench-")))
        suite = Suite(args, root)
        suite.meta.update({"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                           "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "hot_path": hot_path().reason, "args": {k: str(v) for k, v in vars(args).items()}})
        try:
            asyncio.run(suite.run())
        finally:
            leftovers = sweep(root)
            if leftovers:
                print(f"killed {len(leftovers)} leftover processes: {leftovers}", file=sys.stderr)
    suite.meta["seconds"] = round(time.perf_counter() - started, 1)
    result = suite.report()
    print(f"athanor's hot path: {suite.meta['hot_path']}; run took {suite.meta['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.compare:
        print(f"\nagainst {args.compare}:\n" + compare(args.compare, result))
    return 1 if suite.detail.get("failures") else 0  # a MISS is a figure; a failed request is an error


if __name__ == "__main__":
    sys.exit(main())
