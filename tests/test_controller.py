"""The controller in-process against scripted runtimes: failures, stops, re-attach, residency.

Each test runs the real Controller (fixtures/tier.py) with real processes and real signals; what the scripted
runtime does is set by the test, and loads finish when the test opens their gate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from athanor.controller.controller import Controller
from athanor.controller.desired import name_index
from athanor.controller.instance import Phase, TransitionError
from athanor.errors import ModelUnavailable
from athanor.fit import estimate_model
from athanor.managers.process import ProcessSupervisor
from fixtures.tier import Tier, phase, pid_of, supervise_with, until, zombies


async def ready(controller: Controller, name: str) -> int:
    """Use ``name`` once (starting it if need be); returns its runtime's pid."""
    async with controller.use(name) as lease:
        await lease.acquire()
    return pid_of(controller.instances[name])


def test_one_crash_with_requests_in_flight_is_one_failure_and_the_next_use_restarts(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c:
            leases = [c.use("m") for _ in range(4)]
            await asyncio.gather(*(lease.acquire() for lease in leases))
            inst = c.instances["m"]
            first = inst.incarnation
            os.kill(pid_of(inst), signal.SIGKILL)
            # Every request in flight reports it, and the monitor sees it too: one failure, no TransitionError.
            assert await asyncio.gather(*(lease.runtime_died() for lease in leases)) == [True] * 4
            await c.watcher.check()  # the monitor's look must not count it again
            for lease in leases:
                lease.release()
            assert inst.phase is Phase.FAILED and len(inst.failures) == 1
            await asyncio.wait({inst.cleanup_task})
            assert inst.last_failure["reason"] == "Crashed" and inst.last_failure["exitCode"] == -9
            assert inst.last_failure["message"] == "the runtime was killed by SIGKILL (Killed, exit code -9)"
            assert await ready(c, "m") and inst.incarnation == first + 1 and inst.phase is Phase.READY

    tier.run(scenario)


def test_a_stop_during_a_start_does_not_cancel_the_requests_waiting_on_it(tier: Tier):
    load = tier.gate("load")
    tier.model("m")
    tier.script("m", loadGate=load)

    async def scenario() -> None:
        async with tier.controller() as c:
            lease = c.use("m")
            waiting = asyncio.ensure_future(lease.acquire())
            inst = c.instances["m"]
            await phase(inst, Phase.STARTING)
            await c.stop("m")  # aborts the start; the waiter starts it afresh
            await phase(inst, Phase.STARTING)
            assert not waiting.done() and inst.incarnation == 2
            load.open()
            upstream = await waiting
            assert upstream.incarnation == 2 and inst.phase is Phase.READY
            lease.release()

    tier.run(scenario)


class _KillAtTheFirstWait(ProcessSupervisor):
    """Kills the runtime when its exit is first waited for: every reporter has then found it alive and running,
    before anyone can see it dead."""

    def __init__(self, logs: Path):
        super().__init__(logs)
        self.victim = 0
        self.waits = 0

    def wait_exit(self, handle, timeout):  # type: ignore[no-untyped-def]
        self.waits += 1
        if self.waits == 1:
            os.kill(self.victim, signal.SIGKILL)
        return super().wait_exit(handle, 5.0)


def test_reports_racing_past_the_first_look_still_record_one_crash(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c:
            racing = _KillAtTheFirstWait(tier.store.logs_dir)
            supervise_with(c, racing)
            leases = [c.use("m") for _ in range(4)]
            await asyncio.gather(*(lease.acquire() for lease in leases))
            inst = c.instances["m"]
            racing.victim = pid_of(inst)
            assert await asyncio.gather(*(lease.runtime_died() for lease in leases)) == [True] * 4
            for lease in leases:
                lease.release()
            assert inst.phase is Phase.FAILED and len(inst.failures) == 1
            assert racing.waits == 1, "four reports about one runtime: one look, shared"

    tier.run(scenario)


def test_shutdown_refuses_new_work_and_aborts_the_starts_under_way(tier: Tier):
    load = tier.gate("load")
    tier.model("m")
    tier.script("m", loadGate=load)

    async def scenario() -> None:
        async with tier.controller() as c:
            lease = c.use("m")
            waiting = asyncio.ensure_future(lease.acquire())
            await until(lambda: c.instance("m").handle is not None, "the runtime process")
            pid = pid_of(c.instances["m"])
            await c.stop_all()
            with pytest.raises(ModelUnavailable, match="shutting down"):
                await waiting
            with pytest.raises(ModelUnavailable, match="shutting down"):
                c.use("m")
            assert c.instances["m"].phase is Phase.STANDBY
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            lease.release()

    tier.run(scenario)


class _BrokenSupervisor(ProcessSupervisor):
    """A fault injected where no real one can be provoked on demand: an unexpected error inside a start."""

    def start(self, *args: object, **kwargs: object):  # type: ignore[override]
        raise RuntimeError("injected fault")


def test_an_unexpected_error_in_a_start_ends_in_failed_and_shutdown_is_clean(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c:
            supervise_with(c, _BrokenSupervisor(tier.store.logs_dir))
            with pytest.raises(ModelUnavailable, match="injected fault"):
                await ready(c, "m")
            assert c.instances["m"].phase is Phase.FAILED
        # Leaving the block ran close(): stop_all must not have raised.

    tier.run(scenario)


def _abandon(controller: Controller) -> None:
    """What a daemon killed with -9 leaves: its runtimes running, nothing stopped."""
    assert controller._monitor is not None
    controller._monitor.cancel()
    controller.instances.clear()


def test_reattach_stops_runtimes_it_does_not_adopt_instead_of_forgetting_them(tier: Tier):
    for name in ("kept", "deleted", "stopping"):
        tier.model(name)
    tier.gateway(residency={"policy": "memory", "budget": "90%"})

    async def scenario() -> None:
        async with tier.controller() as first:
            pids = {name: await ready(first, name) for name in ("kept", "deleted", "stopping")}
            await first._writer.close()
            _abandon(first)
        tier.delete("deleted")
        with tier.store.state.edit() as state:
            state["instances"]["stopping"]["phase"] = "Stopping"  # the old daemon died in the middle of a stop
        async with tier.controller() as second:
            assert list(second.instances) == ["kept"] and pid_of(second.instances["kept"]) == pids["kept"]
            for name in ("deleted", "stopping"):
                await until(lambda n=name: not psutil.pid_exists(pids[n]) or
                            psutil.Process(pids[n]).status() == psutil.STATUS_ZOMBIE, f"{name} stopped")
            await second._writer.close()
            records = tier.store.state.load()["instances"]
            assert "model was deleted" in records["deleted"]["message"]
            assert "it was Stopping" in records["stopping"]["message"]
        first.managers.get("process", first.gateway()).supervisor.reap()  # this process's children: collect them

    tier.run(scenario)


def test_reattach_reports_an_unreadable_record_instead_of_skipping_it_silently(tier: Tier):
    tier.model("m")
    with tier.store.state.edit() as state:
        state["instances"]["m"] = {"phase": "Ready", "pid": 4242, "handle": {"pid": "not a pid"}}

    async def scenario() -> None:
        async with tier.controller() as c:
            await c._writer.close()
        state = tier.store.state.load()
        assert "pid 4242" in state["instances"]["m"]["message"]
        assert any(e["reason"] == "UnreadableRecord" and "pid 4242" in e["message"] for e in state["events"])

    tier.run(scenario)


def test_a_model_that_cannot_start_does_not_evict_the_loaded_one(tier: Tier):
    tier.model("good")
    tier.model("squatted")

    async def scenario() -> None:
        async with tier.controller() as c:
            pid = await ready(c, "good")
            port = c.model("squatted")["spec"]["port"]
            import socket

            with socket.socket() as squatter:
                squatter.bind(("127.0.0.1", port))
                squatter.listen()
                for _ in range(3):
                    with pytest.raises(ModelUnavailable, match=f"port {port} is in use"):
                        await ready(c, "squatted")
            assert c.instances["good"].phase is Phase.READY and pid_of(c.instances["good"]) == pid
            assert "squatted" not in c.instances or c.instances["squatted"].incarnation == 0

    tier.run(scenario)


def test_disabled_models_never_start_and_pinned_ones_are_never_evicted(tier: Tier):
    tier.model("pinned", residency="pinned")
    tier.model("other")
    tier.model("off", residency="disabled")

    async def scenario() -> None:
        async with tier.controller() as c:
            with pytest.raises(ModelUnavailable, match="disabled"):
                c.use("off")
            pid = await ready(c, "pinned")
            await ready(c, "other")  # single residency, yet the pinned model stays
            assert c.instances["pinned"].phase is Phase.READY and pid_of(c.instances["pinned"]) == pid
            assert c.instances["other"].phase is Phase.READY

    tier.run(scenario)


def test_memory_residency_evicts_the_least_recently_used(tier: Tier):
    for name in ("a", "b", "c"):
        tier.model(name)

    async def scenario() -> None:
        async with tier.controller() as c:
            each = estimate_model(c.doc(), c.model("a")).total
            tier.gateway(residency={"policy": "memory", "budget": f"{int(each * 2.5)}B"})  # room for two
            await ready(c, "a")
            await ready(c, "b")
            await ready(c, "a")  # a is now the most recently used
            await ready(c, "c")
            phases = {name: c.instances[name].phase for name in ("a", "b", "c")}
            assert phases == {"a": Phase.READY, "b": Phase.STANDBY, "c": Phase.READY}

    tier.run(scenario)


def test_the_memory_estimate_counts_the_recipe_s_context(tier: Tier):
    tier.model("long", recipe="long-context")
    tier.model("short", preset={"ctxSize": 2048})

    async def scenario() -> None:
        async with tier.controller(start=False) as c:
            doc = c.doc()
            meta = doc["models"]["long"]["artifact"]["metadata"]
            per_token = 2 * meta["layers"] * (meta.get("kvHeads") or meta["heads"]) * \
                (meta["embeddingLength"] // meta["heads"])  # K and V elements
            long, short = estimate_model(doc, doc["models"]["long"]), estimate_model(doc, doc["models"]["short"])
            assert (long.context, short.context) == (131072, 2048)
            assert long.kv_cache == per_token * 131072 * 34 // 32  # the recipe's q8_0 cache: 34 bytes per 32
            assert short.kv_cache == per_token * 2048 * 2  # f16
            assert long.weights == short.weights

    tier.run(scenario)


def test_the_name_index_has_no_file_less_hf_ids():
    models = {"m": {"spec": {"source": {"hf": {"repo": "org/repo"}}, "aliases": []}}}
    names = name_index(models)
    assert names == {"org/repo": "m", "m": "m"}


def test_starts_crashes_and_failures_leave_no_zombies_and_every_exit_code(tier: Tier):
    tier.model("m")
    tier.model("dud")
    tier.script("dud", exitAtStart=7)

    async def scenario() -> None:
        async with tier.controller() as c:
            inst = c.instance("m")
            before = {p.pid for p in zombies()}
            for _ in range(3):
                await ready(c, "m")
                os.kill(pid_of(inst), signal.SIGKILL)
                await phase(inst, Phase.FAILED)
                await asyncio.wait({inst.cleanup_task})
                assert inst.last_failure["exitCode"] == -9
                inst.failures.clear()  # not a crash loop: this test counts zombies, not failures
            with pytest.raises(ModelUnavailable, match="exited while starting: exit code 7"):
                await ready(c, "dud")
            assert c.instances["dud"].last_failure["exitCode"] == 7
            await c.stop("m")
            await c.stop("dud")
            assert {p.pid for p in zombies()} <= before, "every runtime that exited was reaped"

    tier.run(scenario)


def test_a_runtime_killed_by_a_signal_while_starting_is_reported_with_that_signal(tier: Tier):
    """A runtime built for instructions this CPU does not run dies with SIGILL before it logs why: the failure says
    how it ended, where the client and ``describe`` see it."""
    tier.model("m")
    tier.script("m", signalAtStart=signal.SIGILL)

    async def scenario() -> None:
        async with tier.controller() as c:
            ended = r"exited while starting: killed by SIGILL \(Illegal instruction, exit code -4\)"
            with pytest.raises(ModelUnavailable, match=ended):
                await ready(c, "m")
            inst = c.instances["m"]
            assert inst.last_failure["reason"] == "StartFailed"
            assert "killed by SIGILL" in inst.last_failure["message"]

    tier.run(scenario)


def test_a_frozen_runtime_is_found_by_its_liveness_probe_and_restarted(tier: Tier):
    tier.model("m")
    tier.gateway(healthCheck={"interval": "100ms", "timeout": "200ms", "failureThreshold": 2})

    async def scenario() -> None:
        async with tier.controller() as c:
            pid = await ready(c, "m")
            inst = c.instances["m"]
            os.kill(pid, signal.SIGSTOP)
            await phase(inst, Phase.FAILED, timeout=10)
            assert inst.last_failure["reason"] == "Hung"
            await asyncio.wait({inst.cleanup_task})
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            assert await ready(c, "m") != pid

    tier.run(scenario)


def test_state_is_recorded_off_the_loop_while_another_process_holds_the_lock(tier: Tier):
    tier.model("m")
    lock = tier.store.state.path.with_name("state.json.lock")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"

        async def scenario() -> None:
            async with tier.controller() as c:
                await ready(c, "m")  # phase changes while state.json is locked: serving does not wait
                assert c.instances["m"].phase is Phase.READY
                assert tier.store.state.load()["instances"].get("m", {}).get("phase") != "Ready"
                holder.stdin.close()  # the other process lets go: the queued records are written
                await until(lambda: tier.store.state.load()["instances"].get("m", {}).get("phase") == "Ready",
                            "the record to be written")

        tier.run(scenario)
    finally:
        holder.kill()
        holder.wait()


def test_a_deleted_model_draining_does_not_hold_up_crash_detection(tier: Tier):
    tier.model("deleted")
    tier.model("other")
    tier.gateway(residency={"policy": "memory", "budget": "90%"})

    async def scenario() -> None:
        async with tier.controller() as c:
            await ready(c, "other")
            lease = c.use("deleted")
            await lease.acquire()  # one request in flight: the deleted model drains for up to 30 s
            tier.delete("deleted")
            await phase(c.instances["deleted"], Phase.DRAINING)
            os.kill(pid_of(c.instances["other"]), signal.SIGKILL)
            await phase(c.instances["other"], Phase.FAILED, timeout=5)  # seen while the drain goes on
            assert c.instances["deleted"].phase is Phase.DRAINING
            lease.release()
            await phase(c.instances["deleted"], Phase.STANDBY)

    tier.run(scenario)


class _RecordingRotation(ProcessSupervisor):
    def __init__(self, logs: Path):
        super().__init__(logs)
        self.rotated_on: list[str] = []

    def rotate_logs(self, handle):  # type: ignore[no-untyped-def]
        import threading

        self.rotated_on.append(threading.current_thread().name)
        return super().rotate_logs(handle)


def test_log_rotation_runs_off_the_event_loop(tier: Tier):
    """Rotation copies up to half of a 20 MB log: never on the thread that serves requests."""
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c:
            recording = _RecordingRotation(tier.store.logs_dir)
            supervise_with(c, recording)
            await ready(c, "m")
            c.watcher.next_housekeeping = 0.0
            await c.watcher.check()
            await until(lambda: recording.rotated_on, "a rotation")
            assert "MainThread" not in recording.rotated_on

    tier.run(scenario)


def test_models_json_corrupted_while_serving_keeps_the_last_good_version(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c:
            await ready(c, "m")
            good = tier.store.models.path.read_text()
            tier.store.models.path.write_text(good[: len(good) // 2])
            assert c.resolve("m") == "m" and c.store_problem and "corrupt JSON" in c.store_problem
            await ready(c, "m")
            c.doc()
            c.doc()  # re-reads only on change: reported once
            tier.store.models.path.write_text(good)
            assert c.resolve("m") == "m" and c.store_problem is None
            await c._writer.close()
            reasons = [e["reason"] for e in tier.store.state.load()["events"] if e["kind"] == "Store"]
            assert reasons == ["StoreUnreadable", "StoreReadable"]

    tier.run(scenario)


def test_a_forbidden_phase_change_is_refused():
    from athanor.controller.instance import Instance

    async def scenario() -> None:
        inst = Instance("m")
        with pytest.raises(TransitionError):
            inst.move(Phase.READY)

    asyncio.run(scenario())
