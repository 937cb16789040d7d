"""The controller's second hardening round: one plan for eviction and the memory guard, stops that fail, state that
stays bounded, and crash records that carry the exit code whichever path saw the crash first.

The residency plan is tested as the pure function it is, with the issue's memory figures, and once through the
controller with memory figures injected. Everything else runs the fast tier (fixtures/tier.py): the real Controller,
real processes and signals, scripted runtimes; a stop that fails is a real process supervisor that raises.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from athanor.controller import memory_guard
from athanor.controller.controller import Controller, stop_left_behind
from athanor.controller.instance import RUNNING, Phase
from athanor.controller.persist import StateWriter
from athanor.controller.residency import Resident, plan_room, plan_start
from athanor.errors import ModelUnavailable
from athanor.fit import Memory, estimate_model, headroom
from athanor.managers.process import ProcessSupervisor
from athanor.metrics import Metrics
from athanor.quantities import parse_budget
from athanor.store.store import MAX_EVENTS
from fixtures.serving import gone
from fixtures.tier import Tier, phase, pid_of, supervise_with, until

GIB = 2**30
CHAT = "/v1/chat/completions"


async def ready(controller: Controller, name: str) -> int:
    """Use ``name`` once (starting it if need be); returns its runtime's pid."""
    async with controller.use(name) as lease:
        await lease.acquire()
    return pid_of(controller.instances[name])


# ---------------------------------------------------------------------------------------------- one residency plan


def _issue_machine() -> tuple[Memory, int, int]:
    """Issue 14 #5: a 32 GiB machine with 6 GiB available and an 80% budget."""
    memory = Memory(total=32 * GIB, available=6 * GIB)
    return memory, headroom(memory.total), parse_budget("80%", memory.total)


def test_the_plan_evicts_what_the_machine_needs_not_only_what_the_budget_needs():
    memory, reserve, budget = _issue_machine()
    a = Resident("a", 10 * GIB, last_used=1.0, evictable=True)
    # B at 12 GiB: within the budget beside A (22 of 25.6 GiB), but the machine has 6 GiB available: A must go.
    plan = plan_room(12 * GIB, [a], memory, reserve=reserve, budget=budget)
    assert plan.evict == ("a",) and plan.fits
    assert plan.room == 16 * GIB - reserve
    # At 13 GiB even stopping A leaves too little: refused, and the refusal is about the same evictions.
    too_big = plan_room(13 * GIB, [a], memory, reserve=reserve, budget=budget)
    assert not too_big.fits
    assert plan_room(5 * GIB, [a], Memory(32 * GIB, 6 * GIB + reserve), reserve=reserve, budget=budget).evict == ()


def test_the_plan_goes_least_recently_used_first_and_stops_as_soon_as_both_limits_hold():
    memory = Memory(total=64 * GIB, available=10 * GIB)
    reserve = headroom(memory.total)  # 6 GiB at 64 GiB
    residents = [Resident("new", 8 * GIB, 3.0, True), Resident("old", 8 * GIB, 1.0, True),
                 Resident("pinned", 8 * GIB, 0.5, False), Resident("mid", 8 * GIB, 2.0, True)]
    # 10 available - 6 reserve = 4; 13 needed: two models must go, the two least recently used evictable ones.
    plan = plan_room(13 * GIB, residents, memory, reserve=reserve, budget=parse_budget("90%", memory.total))
    assert plan.evict == ("old", "mid") and plan.fits
    assert plan_room(12 * GIB, residents, memory, reserve=reserve, budget=60 * GIB).evict == ("old",)
    # With memory to spare, the budget decides: 32 GiB loaded + 12 is 44; stopping two brings it to 28 <= 30.
    plan = plan_room(12 * GIB, residents, Memory(64 * GIB, 60 * GIB), reserve=reserve, budget=30 * GIB)
    assert plan.evict == ("old", "mid") and plan.fits
    # single residency (no budget): every evictable model goes, the pinned one stays.
    plan = plan_room(1 * GIB, residents, Memory(64 * GIB, 60 * GIB), reserve=reserve, budget=None)
    assert plan.evict == ("old", "mid", "new")


def test_the_guard_judges_the_evictions_the_plan_makes(tier: Tier):
    tier.model("a")
    tier.model("b")

    async def scenario() -> None:
        async with tier.controller(start=False) as c:
            doc = c.doc()
            policy = {"policy": "memory", "budget": "80%"}
            starved = Memory(32 * GIB, headroom(32 * GIB))  # nothing to spare beyond what "a" would give back
            plan, estimate = plan_start(doc, doc["models"]["b"], [("a", 1.0, True)], policy, starved)
            assert plan.evict == ("a",) and memory_guard.refusal("b", estimate, plan) is None
            plan, estimate = plan_start(doc, doc["models"]["b"], [("a", 1.0, False)], policy, starved)  # pinned
            problem = memory_guard.refusal("b", estimate, plan)
            assert plan.evict == () and problem and problem.startswith("not enough memory: model 'b'")
            assert "by stopping other models" not in problem and "nothing was stopped for it" in problem

    tier.run(scenario)


def test_memory_residency_evicts_when_the_machine_lacks_room_though_the_budget_has_it(tier: Tier):
    tier.model("a")
    tier.model("b")
    tier.gateway(residency={"policy": "memory", "budget": "80%"})

    async def scenario() -> None:
        async with tier.controller() as c:
            each = estimate_model(c.doc(), c.model("a")).total
            # This (injected) machine has room for one model and a half besides its reserve, less what the loaded
            # models hold: both fit the budget, only one fits the machine.
            c.machine_memory = lambda: Memory(32 * GIB, headroom(32 * GIB) + each * 3 // 2 - each * sum(
                i.phase in RUNNING for i in c.instances.values()))
            pid = await ready(c, "a")
            await ready(c, "b")
            assert c.instances["b"].phase is Phase.READY
            assert c.instances["a"].phase is Phase.STANDBY and gone(pid), "a was stopped to make room for b"
            evicted = [e for e in c.events.since() if e["reason"] == "Evicted"]
            assert [(e["name"], e["by"]) for e in evicted] == [("a", "b")]

    tier.run(scenario)


# ---------------------------------------------------------------------------------------------- failed stops


class _StopFails(ProcessSupervisor):
    """The real supervisor, except that its first ``failures`` stops raise what systemctl's 60 s timeout raises."""

    def __init__(self, logs: Path, failures: int):
        super().__init__(logs)
        self.failures = failures
        self.attempts = 0

    def stop(self, handle, timeout=10.0):  # type: ignore[no-untyped-def]
        self.attempts += 1
        if self.attempts <= self.failures:
            raise subprocess.TimeoutExpired(["systemctl", "--user", "stop", f"athanor-model-{handle.name}"], 60)
        return super().stop(handle, timeout)


def test_a_stop_that_fails_keeps_the_handle_says_so_and_is_retried_until_the_runtime_is_gone(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as c:
            failing = _StopFails(tier.store.logs_dir, failures=2)  # the stop, then its first retry
            supervise_with(c, failing)
            pid = await ready(c, "m")
            inst = c.instances["m"]
            stopping = asyncio.ensure_future(c.stop("m"))
            await phase(inst, Phase.FAILED)
            assert pid_of(inst) == pid and not gone(pid), "the handle is kept while the job still runs"
            assert inst.last_failure["reason"] == "StopFailed" and "timed out after 60 seconds" in inst.message
            await c.recorded()
            record = tier.store.state.load()["instances"]["m"]
            assert record["phase"] == "Failed" and record["handle"]["pid"] == pid, "down still finds the job"
            await stopping
            assert inst.phase is Phase.STANDBY and inst.handle is None and gone(pid)
            assert failing.attempts == 3, "the failed stop, one retry that failed, one that stopped it"
            reasons = [e["reason"] for e in c.events.since() if e["name"] == "m"]
            assert reasons[-5:] == ["StopFailed", "StopFailed", "Stopped", "Stopping", "Standby"]
            assert await ready(c, "m") != pid, "and it starts again afterwards"

    tier.run(scenario)


def test_a_stop_that_never_succeeds_leaves_the_job_to_athanor_down(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as first:
            supervise_with(first, _StopFails(tier.store.logs_dir, failures=10**6))
            first.stop_retry_delays = (0.01, 0.01)
            pid = await ready(first, "m")
            await first.stop("m")  # fails, and so do its retries
            inst = first.instances["m"]
            assert inst.phase is Phase.FAILED and pid_of(inst) == pid and not gone(pid)
            with pytest.raises(ModelUnavailable, match="could not be stopped"):
                first.use("m")  # its port and memory may still be held: refused, not started over it
        # The daemon is gone (close() tried and failed to stop it): its record keeps the job's handle.
        record = tier.store.state.load()["instances"]["m"]
        assert record["phase"] == "Failed" and record["handle"]["pid"] == pid and not gone(pid)
        assert record["lastFailure"]["reason"] == "StopFailed"
        assert await stop_left_behind(tier.store) == {"m": pid}  # what 'athanor down' runs
        assert gone(pid)
        assert "handle" not in tier.store.state.load()["instances"]["m"]
        first.managers.get("process", first.gateway()).supervisor.reap()  # this process's child: collect it

    tier.run(scenario)


def test_a_left_runtime_whose_stop_fails_at_reattach_stays_tracked_and_is_stopped_by_a_retry(tier: Tier):
    tier.model("m")

    async def scenario() -> None:
        async with tier.controller() as first:
            pid = await ready(first, "m")
            await first._writer.close()
            assert first._monitor is not None
            first._monitor.cancel()
            first.instances.clear()  # what a daemon killed with -9 leaves: its runtime running, recorded
        with tier.store.state.edit() as state:
            state["instances"]["m"]["phase"] = "Stopping"  # it died in the middle of a stop: the next one stops it
        async with tier.controller(start=False) as second:
            failing = _StopFails(tier.store.logs_dir, failures=1)
            supervise_with(second, failing)
            second.stop_retry_delays = (0.01,)
            await second.reattach()
            inst = second.instances["m"]
            assert inst.phase is Phase.FAILED and inst.last_failure["reason"] == "StopFailed"
            assert pid_of(inst) == pid, "the handle of a job that may still run is kept, not dropped"
            await asyncio.wait({inst.cleanup_task})
            assert inst.handle is None and gone(pid) and failing.attempts == 2
        first.managers.get("process", first.gateway()).supervisor.reap()  # this process's child: collect it

    tier.run(scenario)


# ---------------------------------------------------------------------------------------------- bounded state


def test_a_deleted_model_is_forgotten_once_stopped(tier: Tier):
    tier.model("gone")
    tier.model("kept")
    tier.gateway(residency={"policy": "memory", "budget": "90%"})

    async def scenario() -> None:
        async with tier.controller() as c:
            pid = await ready(c, "gone")
            await ready(c, "kept")
            tier.delete("gone")
            await until(lambda: "gone" not in c.instances, "the deleted model's instance to be dropped")
            assert gone(pid)
            assert list(c.status()["instances"]) == ["kept"]
            scraped = Metrics().render(c).decode()
            assert 'model="kept"' in scraped and 'model="gone"' not in scraped
            await c.recorded()
            assert list(tier.store.state.load()["instances"]) == ["kept"]

    tier.run(scenario)


def test_pending_events_stay_bounded_while_state_json_cannot_be_written(tier: Tier):
    async def scenario() -> None:
        tier.store.state.path.write_text("[]\n")  # corrupt: every write fails until it is repaired
        writer = StateWriter(tier.store)
        sent = [{"seq": n, "reason": "Test"} for n in range(3 * MAX_EVENTS)]
        for event in sent[:10]:
            writer.event(event)
        assert not await writer.settled(0.5)  # the first write fails, its events go back in the queue
        for event in sent[10:]:
            writer.event(event)
            writer.record("m", {"phase": "Standby", "n": event["seq"]})
        assert writer.pending == (1, MAX_EVENTS), "the newest record and the newest MAX_EVENTS events wait"
        tier.store.state.path.unlink()  # repaired: the next retry writes
        assert await writer.settled(10)
        state = tier.store.state.load()
        assert [e["seq"] for e in state["events"]] == [e["seq"] for e in sent[-MAX_EVENTS:]]
        assert state["instances"]["m"]["n"] == sent[-1]["seq"]
        await writer.close()

    tier.run(scenario)


def test_a_burst_of_changes_is_one_write_and_a_reader_that_waits_is_not_kept_waiting(tier: Tier, monkeypatch):
    """A swap changes two instances several times within milliseconds: the writer gathers them into one write of
    state.json (each write holds the GIL for a millisecond or two). A command that waits for its change (settled)
    is written for at once, however long the gathering window: here an hour, which the test would never see end."""
    monkeypatch.setattr("athanor.controller.persist.COALESCE_S", 3600.0)
    writes: list[dict] = []
    real_write = tier.store.state.write
    monkeypatch.setattr(tier.store.state, "write", lambda doc: (writes.append(doc), real_write(doc))[1])

    async def scenario() -> None:
        writer = StateWriter(tier.store)
        for n in range(5):
            writer.record("m", {"phase": "Starting", "n": n})
            writer.event({"seq": n, "reason": "Test"})
            await asyncio.sleep(0)  # the loop turns between changes, as it does during a swap
        assert writes == [], "nothing is written while the burst may go on"
        assert await writer.settled(10)
        assert len(writes) == 1
        state = tier.store.state.load()
        assert state["instances"]["m"]["n"] == 4
        assert [e["seq"] for e in state["events"] if e.get("reason") == "Test"] == [0, 1, 2, 3, 4]
        writer.record("m", {"phase": "Ready", "n": 5})
        await writer.close()  # shutdown writes what is pending at once too
        assert len(writes) == 2 and tier.store.state.load()["instances"]["m"]["n"] == 5

    tier.run(scenario)


def test_a_new_process_handle_is_written_at_once_whatever_the_gathering_window(tier: Tier, monkeypatch):
    """A daemon killed right after a spawn must find the runtime in state.json (else it is left running untracked,
    holding its port): a record with a handle not written before does not wait for its burst."""
    monkeypatch.setattr("athanor.controller.persist.COALESCE_S", 3600.0)

    async def scenario() -> None:
        writer = StateWriter(tier.store)
        writer.record("m", {"phase": "Starting"})  # no process yet: may wait
        writer.record("m", {"phase": "Starting", "handle": {"pid": 4242}, "pid": 4242})
        await until(lambda: tier.store.state.load()["instances"].get("m", {}).get("pid") == 4242,
                    "the spawned process's record in state.json")
        writer.record("m", {"phase": "Ready", "handle": {"pid": 4242}, "pid": 4242})  # the same process: may wait
        await writer.close()
        assert tier.store.state.load()["instances"]["m"]["phase"] == "Ready"

    tier.run(scenario)


# ---------------------------------------------------------------------------------------------- exit codes


def test_a_crash_a_request_notices_first_is_recorded_with_its_exit_code(tier: Tier):
    answer = tier.gate("answer")
    tier.model("m")
    tier.script("m", answerGate=answer)

    async def scenario() -> None:
        # No monitor: only the request in flight can notice the crash.
        async with tier.controller(start=False) as c, tier.ingress(c) as url, aiohttp.ClientSession() as session:
            await c.start("m")
            inst = c.instances["m"]
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            call = asyncio.ensure_future(session.post(url + CHAT, json=body))
            await until(lambda: "request /v1/chat" in tier.log("m"), "the request in flight")
            os.kill(pid_of(inst), signal.SIGKILL)
            async with await call as resp:
                assert resp.status == 502
            assert inst.phase is Phase.FAILED
            expected = "the runtime was killed by SIGKILL (Killed, exit code -9)"
            assert inst.message == expected and inst.last_failure["exitCode"] == -9
            crashed = [e for e in c.events.since() if e["reason"] == "Crashed"]
            assert len(crashed) == 1 and crashed[0]["message"].endswith(expected)
            assert crashed[0]["exitCode"] == -9

    tier.run(scenario)
