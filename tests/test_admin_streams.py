"""The admin API's streams and model views.

- An idle event stream keeps beating and still delivers the next event, on the same connection, to the API and to
  ``athanor get events -w`` (issue 14, 1); a followed log beats too, and ``athanor logs -f`` follows through the
  admin API with its output clean of heartbeats (issue 14, 1 and "two log-follow loops"); with no gateway running
  it still follows the file.
- ``/models`` reads the runtimes' process trees off the event loop (issue 14, 10).
- A model whose weights are unreadable has one status word, in the admin API and in ``athanor get`` (issue 20, 5).

The heartbeat is shortened through ``ATHANOR_HEARTBEAT_S``, which the in-process tier, the daemon and the CLI all
read, so an idle stretch of several heartbeats takes a fraction of a second. Waits read the stream for heartbeats
rather than sleeping.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from athanor import views
from athanor.heartbeat import HEARTBEAT_ENV
from athanor.liveness import daemon_record
from athanor.store import open_store
from conftest import ATHANOR
from fixtures.serving import free_port, start_daemon, wait_until
from fixtures.tier import Tier

KEEP_ALIVE = b": keep-alive\n"
BEATS = 4  # heartbeats an idle stream must survive before the next event is asked of it
LINE_WAIT_S = 30.0


def model_m(tier: Tier) -> None:
    """Model ``m`` on the scripted runtime, on a free port of its own rather than one from the default range, which
    runtimes of other test runs on this machine may hold."""
    tier.model("m", port=free_port())


# ---------------------------------------------------------------------------------------------- the fast tier


def test_an_idle_event_stream_beats_and_then_delivers_the_next_event(tier: Tier, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(HEARTBEAT_ENV, "0.05")
    model_m(tier)

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            since = max((e["seq"] for e in c.events.since()), default=0)
            async with session.get(url + f"/athanor/v1/events?follow=1&since={since}") as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                beats = 0
                while beats < BEATS:  # idle: nothing but heartbeats (each a comment and its blank line)
                    line = await resp.content.readline()
                    assert line in (KEEP_ALIVE, b"\n"), f"an idle stream sent {line!r}"
                    beats += line == KEEP_ALIVE
                await c.start("m")
                phases = []
                while "Ready" not in phases:
                    line = await resp.content.readline()
                    assert line, "the stream ended"
                    assert not line.startswith(b"HTTP/"), f"a second response inside the stream: {line!r}"
                    if line.startswith(b"data: "):
                        phases.append(json.loads(line[6:]).get("phase"))
        assert phases == ["Starting", "Ready"]

    tier.run(scenario)


def test_a_quiet_followed_log_beats_then_carries_the_next_runtime(tier: Tier, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(HEARTBEAT_ENV, "0.05")
    model_m(tier)

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            path = url + "/athanor/v1/models/m/logs?follow=1&lines=1"
            async with session.get(path, headers={"Accept": "text/event-stream"}) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                pieces: list[dict[str, Any]] = []
                beats = 0
                while beats < BEATS or not pieces:
                    line = await resp.content.readline()
                    assert line, "the stream ended"
                    beats += line == KEEP_ALIVE
                    if line.startswith(b"data: "):
                        pieces.append(json.loads(line[6:]))
                assert pieces == [{"text": tier.log("m").splitlines()[-1] + "\n"}], "lines=1: the last line"
                await c.restart("m")
                while not any("listening on" in p["text"] for p in pieces[1:]):
                    line = await resp.content.readline()
                    assert line, "the stream ended"
                    if line.startswith(b"data: "):
                        pieces.append(json.loads(line[6:]))
        marker = next(p for p in pieces if "incarnation" in p)
        assert marker == {"text": "--- athanor: runtime 2 of m starting ---\n", "incarnation": 2}
        assert pieces.index(marker) < next(i for i, p in enumerate(pieces) if i and "listening on" in p["text"])

    tier.run(scenario)


def test_the_models_view_reads_process_trees_off_the_event_loop(tier: Tier):
    model_m(tier)
    psutil_dir = os.path.dirname(psutil.__file__)

    async def scenario() -> None:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            on_loop: list[str] = []

            def profile(frame: Any, event: str, arg: Any) -> None:
                """Every call from views.py into psutil made on this thread, the loop's (setprofile is per thread)."""
                caller = frame.f_back
                if (event == "call" and frame.f_code.co_filename.startswith(psutil_dir) and caller is not None
                        and caller.f_code.co_filename == views.__file__):
                    on_loop.append(frame.f_code.co_name)

            sys.setprofile(profile)
            try:
                async with session.get(url + "/athanor/v1/models") as resp:
                    listed = await resp.json()
                async with session.get(url + "/athanor/v1/models/m") as resp:
                    one = await resp.json()
            finally:
                sys.setprofile(None)
        for view in (listed["items"][0], one):
            assert view["status"]["rssBytes"] > 0 and "uptimeSeconds" in view["status"], "the process was read"
        assert on_loop == [], f"psutil ran on the event loop's thread: {on_loop}"

    tier.run(scenario)


def test_unreadable_weights_show_one_status_in_the_admin_api_and_in_get(tier: Tier, cli: Any):
    weights = tier.root / "weights" / "broken.gguf"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 10)  # a GGUF head that ends mid-header
    tier.model("broken")

    async def scenario() -> list[dict[str, Any]]:
        async with tier.controller() as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            async with session.get(url + "/athanor/v1/models/broken") as resp:
                one = await resp.json()
            async with session.get(url + "/athanor/v1/models") as resp:
                listed = await resp.json()
        return [one, listed["items"][0]]

    api = tier.run(scenario)
    table = cli("get", "models", "broken").stdout.splitlines()
    column = table[0].split().index("STATUS")
    shown = json.loads(cli("get", "models", "broken", "-o", "json").stdout)
    words = {view["status"]["summary"] for view in [*api, shown]} | {table[1].split()[column]}
    assert words == {"Unreadable"}
    assert api[0]["status"]["conditions"][0]["reason"] == "Unreadable"


# ---------------------------------------------------------------------------------- a real daemon and the CLI


@pytest.fixture
def daemon(tier: Tier, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """``athanor serve`` on the tier's store (model ``m`` on the scripted runtime), heartbeats every 0.1 s; yields
    its port. ``athanor down`` at the end, then the tier checks that no runtime is left."""
    monkeypatch.setenv(HEARTBEAT_ENV, "0.1")
    model_m(tier)
    port = free_port()
    proc = start_daemon(home, port)
    try:
        wait_until(lambda: daemon_record(open_store(home)) is not None, 30, "the daemon's record")
        yield port
    finally:
        subprocess.run([ATHANOR, "down"], env=dict(os.environ), capture_output=True, timeout=120)
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


class Watched:
    """A CLI command that streams: its stdout lines through a queue, read with a deadline; killed at the end."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([ATHANOR, *args], env=dict(os.environ), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self) -> str:
        try:
            line = self.lines.get(timeout=LINE_WAIT_S)
        except queue.Empty:
            raise AssertionError(f"no line in {LINE_WAIT_S} s; so far: {self.seen}") from None
        if line is None:
            self.proc.wait(10)
            raise AssertionError(f"it exited ({self.proc.returncode}): {self.proc.stderr.read()}; saw {self.seen}")
        self.seen.append(line)
        return line

    def until(self, wanted: str) -> str:
        while wanted not in (line := self.next_line()):
            pass
        return line

    def connected(self, port: int) -> bool:
        """It holds a connection to the gateway (its stream is open)."""
        return any(conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
                   for conn in psutil.Process(self.proc.pid).net_connections(kind="tcp"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _idle_beats(url: str, beats: int, accept: str | None = None) -> None:
    """Read a stream of the gateway until it has sent ``beats`` heartbeats while nothing else happened."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=60) as resp:
        seen = 0
        while seen < beats:
            line = resp.readline()
            assert line, "the stream ended"
            seen += line == KEEP_ALIVE


def test_get_events_watch_prints_the_next_event_after_an_idle_stretch(daemon: int):
    watcher = Watched("get", "events", "-w")
    try:
        wait_until(lambda: watcher.connected(daemon), 30, "the watcher's stream to open")
        _idle_beats(f"http://127.0.0.1:{daemon}/athanor/v1/events?follow=1", BEATS)
        assert watcher.proc.poll() is None, "the watcher is still there after the idle stretch"
        started = subprocess.run([ATHANOR, "start", "m"], env=dict(os.environ), capture_output=True, text=True,
                                 timeout=120)
        assert started.returncode == 0, started.stderr
        line = watcher.until("model/m")
        while " Ready " not in line:
            line = watcher.until("model/m")
        assert line.split()[1:4] == ["Normal", "Ready", "model/m"]
    finally:
        watcher.stop()


def test_logs_follow_goes_through_the_gateway_and_prints_only_the_log(daemon: int, home: Path):
    started = subprocess.run([ATHANOR, "start", "m"], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    log = home / "logs" / "m.log"
    follower = Watched("logs", "m", "-f", "-n", "1")
    try:
        assert follower.next_line() == log.read_text().splitlines()[-1]
        wait_until(lambda: follower.connected(daemon), 30, "the follower's stream to open")
        _idle_beats(f"http://127.0.0.1:{daemon}/athanor/v1/models/m/logs?follow=1&lines=0", BEATS,
                    "text/event-stream")
        restarted = subprocess.run([ATHANOR, "restart", "m"], env=dict(os.environ), capture_output=True, text=True,
                                   timeout=120)
        assert restarted.returncode == 0, restarted.stderr
        follower.until("--- athanor: runtime 2 of m starting ---")
        follower.until("listening on")
    finally:
        follower.stop()
    written = log.read_text().splitlines()
    printed = [line for line in follower.seen if not line.startswith("--- athanor: runtime ")]
    assert printed == written[written.index(printed[0]):][:len(printed)], "the log's own lines, nothing else"


def test_logs_follow_without_a_gateway_follows_the_file_across_a_rotation(tier: Tier, home: Path):
    tier.model("m")
    log = home / "logs" / "m.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("one\ntwo\n")
    follower = Watched("logs", "m", "-f", "-n", "1")
    try:
        assert follower.next_line() == "two"
        with open(log, "a") as fh:
            fh.write("three\n")
        assert follower.next_line() == "three"
        os.truncate(log, 0)  # copytruncate, as logs.rotate does
        with open(log, "a") as fh:
            fh.write("four\n")
        assert follower.next_line() == "four"
    finally:
        follower.stop()
