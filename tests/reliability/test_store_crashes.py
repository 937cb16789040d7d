"""The store under kill -9: concurrent writers killed at random points, and CLI applies racing the daemon's writes.

The store's promise (athanor/store/files.py): a reader sees the old or the new file, never a torn one, and a
read-modify-write under the file lock loses nobody's write. Here real processes write through the same calls the
CLI and the daemon make (``actions.apply``, the daemon's ``StateWriter``, ``registry.scan``), and are killed with
SIGKILL at seeded random points. After every kill both files must parse, and whatever a writer reported as done
(after its call returned) must be in the store.

The writers are forked from the test process, which has imported and warmed up everything first, so a writer
starts in a few milliseconds and 500+ kills fit in seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from athanor import actions, registry
from athanor.controller.persist import StateWriter
from athanor.listener import record_daemon
from athanor.store import Store, open_store
from conftest import ATHANOR, write
from fixtures.tiny_models import add_gguf_repo

SEED = 1717
KILLS = 520
APPLY_SLOTS = 3  # writers applying models at once
STATE_SLOTS = 2  # writers recording instance status at once, as the daemon does
OWNED = 6  # models each apply slot re-applies with new versions (besides fresh ones)
FRESH_LIMIT = 300  # fresh models in all (each takes a port from the default range of 1,000)
STUCK_S = 30.0  # a writer silent this long (no report, no exit) is stuck: the test fails rather than hangs


def model_spec(name: str, version: int) -> str:
    return (f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\nspec:\n"
            f"  runtime: llama-server\n  source: {{path: /models/{name}.gguf}}\n  env: {{GEN: '{version}'}}\n")


def assert_spec(doc: dict, name: str, version: int) -> None:
    """The stored model is exactly what ``model_spec(name, version)`` applied (plus the port athanor assigns)."""
    spec = doc["models"][name]["spec"]
    assert spec["runtime"] == "llama-server" and spec["source"] == {"path": f"/models/{name}.gguf"}, (name, spec)
    assert spec["env"] == {"GEN": str(version)}, (name, spec)


def stored_version(doc: dict, name: str) -> int:
    return int(doc["models"][name]["spec"]["env"]["GEN"])


def temps(home: Path) -> list[str]:
    """Temp files of the store's atomic writes (``.models.json.<random>.tmp``), as a killed writer leaves them."""
    return sorted(p.name for p in home.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def parse_both(store: Store) -> tuple[dict, dict]:
    """Both files parse as JSON and load through the store (its shape checks included)."""
    for path in (store.models.path, store.state.path):
        if path.exists():
            json.loads(path.read_text(encoding="utf-8"))
    return store.models.load(), store.state.load()


# ------------------------------------------------------------------------------------------------ forked writers


def _in_child(report_fd: int, keep: set[int], body: Callable[[Callable[[str], None]], None]) -> None:
    """Run ``body`` in a forked child and never return: every fd but ``keep`` closed, so each pipe's EOF comes when
    its own writer dies; ``report`` writes one line (atomic: below PIPE_BUF) once a write is done."""
    code = 0
    try:
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass  # the listing's own descriptor, already gone
        body(lambda line: os.write(report_fd, (line + "\n").encode()))
    except BaseException:  # noqa: BLE001 - a child must never return into pytest
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _apply_body(home: Path, ops: list[tuple[str, int]]) -> Callable[[Callable[[str], None]], None]:
    def body(report: Callable[[str], None]) -> None:
        store = open_store(home)
        for name, version in ops:
            actions.apply(store, ["-"], stdin=io.StringIO(model_spec(name, version)))  # what `athanor apply` calls
            report(f"A {name} {version}")
    return body


def _state_body(home: Path, ops: list[tuple[str, int]]) -> Callable[[Callable[[str], None]], None]:
    def body(report: Callable[[str], None]) -> None:
        async def run() -> None:
            writer = StateWriter(open_store(home))  # the daemon's status path: records and events, off the loop
            for instance, seq in ops:
                writer.record(instance, {"phase": "Ready", "message": f"seq {seq}", "generation": seq, "seq": seq})
                writer.event({"kind": "Model", "name": instance, "reason": "Ready", "message": f"seq {seq}"})
                assert await writer.settled(30), "state.json stayed locked"
                report(f"S {instance} {seq}")
        asyncio.run(run())
    return body


@dataclass
class Slot:
    kind: str  # "A" (apply) or "S" (state)
    index: int
    pid: int = 0
    fd: int = -1
    buffer: bytes = b""
    reports: int = 0
    wait_reports: int = 0
    kill_at: float | None = None
    delay: float = 0.0


@dataclass
class Tally:
    kills: int = 0
    finished: int = 0  # children that ran their whole list before their kill point
    temps_seen: int = 0  # kills after which a writer's temp file was on disk: killed between mkstemp and rename
    applied: dict[str, int] = field(default_factory=dict)  # name -> newest version reported applied
    status: dict[str, int] = field(default_factory=dict)  # instance -> newest seq reported written
    apply_reports: int = 0
    status_reports: int = 0
    fresh: list[str] = field(default_factory=list)


class KillLoop:
    """Keeps every slot busy with a forked writer and kills each at a seeded random point."""

    def __init__(self, home: Path, rng: random.Random):
        self.home = home
        self.store = open_store(home)
        self.rng = rng
        self.tally = Tally()
        self.version = 0
        self.handed: dict[str, int] = {}  # name -> newest version handed to a child
        self.slots = [Slot("A", i) for i in range(APPLY_SLOTS)] + [Slot("S", i) for i in range(STATE_SLOTS)]

    def _ops(self, slot: Slot) -> list[tuple[str, int]]:
        ops = []
        for _ in range(5):  # more than most children get through before their kill point
            self.version += 1
            if slot.kind == "S":
                name = f"inst-{slot.index}-{self.rng.randrange(4)}"
            elif self.rng.random() < 0.3 and len(self.tally.fresh) < FRESH_LIMIT:
                name = f"fresh-{len(self.tally.fresh)}"
                self.tally.fresh.append(name)
            else:
                name = f"own-{slot.index}-{self.rng.randrange(OWNED)}"
            self.handed[name] = self.version
            ops.append((name, self.version))
        return ops

    def spawn(self, slot: Slot) -> None:
        ops = self._ops(slot)
        body = (_apply_body if slot.kind == "A" else _state_body)(self.home, ops)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            _in_child(write_fd, {0, 1, 2, write_fd}, body)
        os.close(write_fd)
        slot.pid, slot.fd, slot.buffer, slot.reports = pid, read_fd, b"", 0
        slot.wait_reports = self.rng.randrange(3)  # kill after 0, 1 or 2 completed writes ...
        slot.kill_at = None
        slot.delay = self.rng.uniform(0.0, 0.006)  # ... plus up to 6 ms into the next one
        if slot.wait_reports == 0:
            slot.kill_at = time.monotonic() + slot.delay

    def _take(self, slot: Slot, data: bytes) -> None:
        slot.buffer += data
        *lines, slot.buffer = slot.buffer.split(b"\n")
        for line in lines:
            kind, name, number = line.decode().split()
            target = self.tally.applied if kind == "A" else self.tally.status
            assert int(number) > target.get(name, 0), "versions only grow per name"
            target[name] = int(number)
            if kind == "A":
                self.tally.apply_reports += 1
            else:
                self.tally.status_reports += 1
            slot.reports += 1
        if slot.kill_at is None and slot.reports >= slot.wait_reports:
            slot.kill_at = time.monotonic() + slot.delay

    def _reap(self, slot: Slot, killed: bool) -> None:
        _, status = os.waitpid(slot.pid, 0)
        os.set_blocking(slot.fd, False)
        while True:  # what it reported before it died
            try:
                data = os.read(slot.fd, 65536)
            except BlockingIOError:
                raise AssertionError("a writer's pipe is held open by another process") from None
            if not data:
                break
            self._take(slot, data)
        os.close(slot.fd)
        slot.fd, slot.kill_at = -1, None
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and killed:
            self.tally.kills += 1
        else:  # it ran its whole list before its kill point came (the kill then found a zombie)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"a writer failed (status {status})"
            self.tally.finished += 1
        self.tally.temps_seen += bool(temps(self.home))
        parse_both(self.store)  # after every kill: both files parse and load

    def run(self) -> None:
        for slot in self.slots:
            self.spawn(slot)
        while self.tally.kills < KILLS:
            now = time.monotonic()
            due = [s.kill_at - now for s in self.slots if s.kill_at is not None]
            readable, _, _ = select.select([s.fd for s in self.slots], [], [], max(0.0, min(due)) if due else STUCK_S)
            assert readable or due, f"no writer reported anything in {STUCK_S:.0f} s: stuck on the store's lock?"
            for slot in self.slots:
                if slot.fd in readable:
                    data = os.read(slot.fd, 65536)
                    if not data:  # it ran its whole list (or failed): no kill this time
                        self._reap(slot, killed=False)
                        self.spawn(slot)
                        continue
                    self._take(slot, data)
                if slot.kill_at is not None and time.monotonic() >= slot.kill_at:
                    os.kill(slot.pid, signal.SIGKILL)
                    self._reap(slot, killed=True)
                    self.spawn(slot)

    def stop(self) -> None:
        for slot in self.slots:
            if slot.fd != -1:
                os.kill(slot.pid, signal.SIGKILL)  # not reaped yet: at worst a zombie, never another process
                self._reap(slot, killed=True)


def warm_up(home: Path) -> None:
    """Import and exercise every path once in this process, so the forked writers start warm."""
    store = open_store(home)
    actions.apply(store, ["-"], stdin=io.StringIO(model_spec("warm", 0)))

    async def status() -> None:
        writer = StateWriter(store)
        writer.record("warm", {"phase": "Standby"})
        assert await writer.settled(30)
    asyncio.run(status())


def test_writers_killed_at_random_points_never_tear_the_store_nor_lose_a_reported_write(home: Path):
    rng = random.Random(SEED)
    warm_up(home)
    loop = KillLoop(home, rng)
    started = time.monotonic()
    try:
        loop.run()
    finally:
        loop.stop()
    tally = loop.tally
    print(f"\nstore kill -9 fuzz (seed {SEED}): {tally.kills} kills, {tally.finished} writers finished unkilled, "
          f"{tally.apply_reports} applies and {tally.status_reports} status writes reported, "
          f"{tally.temps_seen} kills left a temp file (killed mid-write), {time.monotonic() - started:.1f} s")
    assert tally.kills >= 500

    models, state = parse_both(loop.store)
    print(f"models.json holds {len(models['models'])} models, state.json {len(state['instances'])} instances")
    for name, version in tally.applied.items():  # every reported apply is there, or a newer one of the same name
        assert name in models["models"], f"{name} (applied as version {version}) is gone (seed {SEED})"
        found = stored_version(models, name)
        assert version <= found <= loop.handed[name], (name, version, found)
        assert_spec(models, name, found)
    for instance, seq in tally.status.items():
        assert state["instances"][instance]["seq"] >= seq, f"{instance}: status {seq} was lost (seed {SEED})"

    # A killed writer's temp file is removed by the next write of its target, which also still takes the lock.
    actions.apply(loop.store, ["-"], stdin=io.StringIO(model_spec("last", 1)))
    with loop.store.state.edit() as doc:
        doc["instances"]["last"] = {"phase": "Standby"}
    assert temps(home) == []
    assert_spec(loop.store.models.load(), "last", 1)


# ------------------------------------------------------------------------------- CLI applies racing the daemon


def _daemon_body(home: Path, hf_repo: Path, stop_fd: int) -> Callable[[Callable[[str], None]], None]:
    """The daemon's two writers, side by side until told to stop: the StateWriter recording instance status and
    events (and the daemon record, as the listener writes it), and the cache watcher's rescan of models.json, with
    the watched repo coming and going so that every rescan changes the file."""
    def body(report: Callable[[str], None]) -> None:
        store = open_store(home)
        parked = hf_repo.with_name(hf_repo.name + ".away")

        def stopping() -> bool:
            return bool(select.select([stop_fd], [], [], 0)[0])

        async def run() -> None:
            writer = StateWriter(store)
            seq, scans, last_record = 0, 0, 0
            while not stopping():
                seq += 1
                for i in range(3):
                    writer.record(f"daemon-{i}", {"phase": "Ready", "message": f"seq {seq}", "seq": seq})
                if seq % 10 == 0:
                    writer.event({"kind": "Model", "name": "daemon-0", "reason": "Ready", "message": f"seq {seq}"})
                    await asyncio.to_thread(record_daemon, store, {"pid": os.getpid(), "seq": seq})
                    last_record = seq
                if seq % 3 == 0:
                    (hf_repo.rename(parked) if hf_repo.exists() else parked.rename(hf_repo))
                    changed = await asyncio.to_thread(registry.scan, store, record=False)
                    scans += any(c.action != "unchanged" for c in changed.changes)
                assert await writer.settled(30)
            if not hf_repo.exists():
                parked.rename(hf_repo)
            await asyncio.to_thread(registry.scan, store, record=False)
            await writer.close()
            report(f"{seq} {scans} {last_record}")
        asyncio.run(run())
    return body


def wait_exit(pid: int, timeout: float) -> int:
    """The child's wait status once it exits; killed (and the test failed) if it has not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the daemon's writers did not stop within {timeout:.0f} s")
        time.sleep(0.02)  # polling a condition with a deadline


def test_cli_applies_racing_the_daemon_s_status_writes_and_rescans_lose_nothing(home: Path, hf_root: Path,
                                                                                  tmp_path: Path):
    gguf = add_gguf_repo(hf_root, "race-org/tiny-GGUF")
    repo = gguf.parents[2]  # models--race-org--tiny-GGUF
    store = open_store(home)
    registry.scan(store)
    [discovered] = store.models.load()["models"]
    specs = [write(tmp_path / "specs" / f"cli-{i}.yaml", model_spec(f"cli-{i}", i + 1)) for i in range(18)]
    specs += [write(tmp_path / "specs" / f"again-{i}.yaml", model_spec("cli-0", 100 + i)) for i in range(3)]

    stop_r, stop_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _in_child(report_w, {0, 1, 2, report_w, stop_r}, _daemon_body(home, repo, stop_r))
    os.close(report_w)
    os.close(stop_r)
    started = time.monotonic()
    try:
        def apply(spec: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run([ATHANOR, "apply", "-f", str(spec)], capture_output=True, text=True,
                                  env=dict(os.environ), timeout=120)

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(apply, specs[:18]))
        results += [apply(spec) for spec in specs[18:]]  # in order: the last one's version must win
    finally:
        os.write(stop_w, b"x")
        status = wait_exit(pid, STUCK_S)
        with os.fdopen(report_r) as fh:
            said = fh.read().split()
        os.close(stop_w)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the daemon's writers failed"
    seq, scans, last_record = map(int, said)
    for result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    print(f"\nCLI applies racing the daemon: {len(results)} `athanor apply` runs, {seq} status rounds "
          f"({3 * seq} instance records), {scans} rescans that rewrote models.json, "
          f"{time.monotonic() - started:.1f} s")
    assert scans >= 1 and seq >= 1

    models, state = parse_both(store)
    for i in range(1, 18):
        assert_spec(models, f"cli-{i}", i + 1)
    assert_spec(models, "cli-0", 102)
    assert discovered in models["models"] and models["models"][discovered]["artifact"] is not None
    for i in range(3):
        assert state["instances"][f"daemon-{i}"]["seq"] == seq, "the daemon's last status is what state.json holds"
    assert (state["daemon"] or {}).get("seq", 0) == last_record
    created = {e["name"] for e in state["events"] if e.get("reason") == "Created"}
    assert {f"cli-{i}" for i in range(18)} <= created, "every apply's event is recorded beside the daemon's"
    assert temps(home) == []
