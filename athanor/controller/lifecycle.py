"""One runtime's life: its start up to Ready, its stop down to Standby, and the clean-up after a failure.

The controller decides which models run, when and for whom (``controller.py``); this is how one of its decisions
is carried out on a process, through the model's service manager, with KV parking's restore step between "runtime
ready" and Ready (``parking.py``; its park step runs before ``halt`` once a stop has drained). Every outcome is a
phase: a start ends Ready, Failed (its process cleaned up here, in a task a new start waits for) or Standby; a stop
ends Standby, or Failed with the handle kept (``StopFailed``) when its manager could not stop the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from athanor.controller import failures
from athanor.controller.desired import DesiredState
from athanor.controller.instance import Instance, Phase
from athanor.controller.log_watch import watch_log
from athanor.controller.parking import Emit, Parking
from athanor.controller.readiness import NotReady, StartAborted, wait_ready
from athanor.controller.records import job_of, pid_of
from athanor.controller.stopping import (
    HUNG_GRACE_S,
    STOP_GRACE_S,
    STOP_RETRY_DELAYS_S,
    STOP_TIMEOUT_S,
    StopFailed,
    ending,
    exit_text,
    stop_retrying,
)
from athanor.controller.tasks import Spawn
from athanor.errors import AthanorError
from athanor.managers import Managers, jobs
from athanor.managers.base import Handle, JobState, ServiceManager, located
from athanor.parking.slots import SlotError
from athanor.quantities import parse_duration
from athanor.runtimes import secret as runtime_secret
from athanor.runtimes.launch import LaunchSpec

log = logging.getLogger("athanor.controller")


class Lifecycle:
    """Starts, stops and cleans up runtimes for the controller, which owns the instances and calls in here."""

    def __init__(self, managers: Managers, home: Path, logs_dir: Path, session: aiohttp.ClientSession,
                 desired: DesiredState, save: Callable[[Instance], None], emit: Emit, spawn: Spawn,
                 hurry: asyncio.Event):
        self._managers = managers
        self._home = home
        self._logs_dir = logs_dir
        self._session = session
        self._desired = desired
        self._save = save
        self._emit = emit
        self._spawn = spawn
        self._hurry = hurry  # set at shutdown: a failed stop is retried once more at most
        self.parking = Parking(session, home, lambda: desired.gateway, emit, logs_dir)
        self.stop_retry_delays: tuple[float, ...] = STOP_RETRY_DELAYS_S  # between the attempts of a failed stop
        self._spare_secrets: dict[str, asyncio.Task[tuple[str, str] | None]] = {}  # model -> its next start's

    async def spare_secret(self, name: str) -> tuple[str, str] | None:
        """The secret written for ``name``'s next start when its last job stopped, (file, secret); taken once."""
        task = self._spare_secrets.pop(name, None)
        if task is None:
            return None
        await asyncio.wait({task})
        return None if task.cancelled() or task.exception() is not None else task.result()

    def _write_spare_secret(self, inst: Instance, manager: ServiceManager) -> None:
        """The job is gone: write its next start's secret now, off the next swap's critical path. Not at shutdown,
        and not for a cluster's pods, whose secret their manager keeps."""
        launch = inst.launch
        if launch is None or not launch.secret_file or not manager.local or self._hurry.is_set():
            return
        self._spare_secrets[inst.name] = self._spawn(asyncio.to_thread(runtime_secret.spare, launch.secret_file),
                                                     f"secret-{inst.name}")

    async def start(self, inst: Instance, obj: dict[str, Any], launch: LaunchSpec,
                    spawned: Callable[[], None] = lambda: None) -> None:
        """Start one runtime and wait for it; ends Ready, Failed (process gone), or Standby when a stop aborted it.
        Never raises: every outcome is a phase."""
        inst.launch = launch
        inst.generation = obj["metadata"].get("generation", 1)
        inst.move(Phase.STARTING, "starting")
        inst.slot_tokens = 0  # a new process: every slot empty (a restored one reports none until it serves)
        try:
            if launch.secret_file and launch.secret is None:  # the controller issues it with the preflight
                launch = inst.launch = await asyncio.to_thread(runtime_secret.issued, launch)
            manager = self._managers.current(self._desired.gateway)
            job = jobs.model_job(inst.name, launch, self._home)
            handle = inst.handle = await manager.start(job)
            spawned()  # its process runs: what it replaces may go now, while it loads
            parked = self.parking.before_start(inst.name, launch)  # verified meanwhile too, not before the spawn
            self._save(inst)
            timeout = parse_duration(self._desired.setting(obj, "startupTimeout")) or 3600.0
            watch = watch_log(job.log_path) if manager.local else None  # its log is on this machine
            try:
                waited, launch = await wait_ready(self._session, lambda: located(manager, handle, launch),
                                                  timeout=timeout, alive=lambda: self.alive(inst), abort=inst.abort,
                                                  written=watch.written if watch is not None else None)
            finally:
                if watch is not None:
                    watch.close()
            inst.launch = launch  # at the address it answered on (a pod's, under Kubernetes)
            await self.parking.restore(inst, parked)  # before the first request: queued ones wait for it
        except StartAborted:
            await self.halt(inst, "start aborted by a stop")
            return
        except NotReady as exc:
            self.fail(inst, await self._why(inst, str(exc)), "StartFailed")
        except AthanorError as exc:
            self.fail(inst, str(exc), "StartFailed")
        except SlotError as exc:  # its parked file is gone now: the next start prefills (the controller retries)
            self.fail(inst, f"a parked slot could not be restored or erased ({exc}): restarting without it",
                       "RestoreFailed")
        except Exception as exc:  # noqa: BLE001 - any surprise must end in a phase, never leave it Starting
            log.exception("%s: unexpected error while starting", inst.name)
            self.fail(inst, f"unexpected error while starting: {exc!r}", "StartFailed")
        else:
            log.info("%s ready in %.2f s (%s)", inst.name, waited, job_of(inst.handle))
            inst.load_seconds = time.monotonic() - inst.starting_since
            inst.refusal = None
            inst.move(Phase.READY, f"ready in {waited:.2f} s")
            return
        if inst.cleanup_task is not None:
            await asyncio.wait({inst.cleanup_task})

    async def _why(self, inst: Instance, reason: str) -> str:
        """A start that failed, with how its process ended (a signal says what the log does not: SIGILL, a build
        for another CPU), or what its manager says of the job when that is more than a process's exit (a pod
        that cannot pull its image, a claim not found): the runtime's log has nothing then."""
        handle = inst.handle
        if handle is None:
            return reason
        manager = self.manager_of(handle)
        try:
            state = await manager.observe(handle)
        except Exception:  # noqa: BLE001 - the reason stands without the detail
            return reason
        if manager.local:
            code = state.exit_code
            return f"{reason}: {ending(code)}" if code is not None and not state.running else reason
        return f"{reason} ({state.detail})" if state.detail else reason

    def manager_of(self, handle: Handle) -> ServiceManager:
        """The service manager that runs the job of ``handle``."""
        return self._managers.of(handle, self._desired.gateway)

    async def observe(self, inst: Instance) -> JobState | None:
        """What the instance's manager says about its job now (None: it has no job)."""
        handle = inst.handle
        return None if handle is None else await self.manager_of(handle).observe(handle)

    async def alive(self, inst: Instance) -> bool:
        state = await self.observe(inst)
        return state is not None and state.running

    def fail(self, inst: Instance, reason: str, kind: str, exit_code: int | None = None) -> None:
        """Record one failure and move to Failed at once (no await: nothing can slip in between); the process, if
        any is left, is stopped by a clean-up task that a new start waits for."""
        failure = failures.count_failure(inst, kind, reason, exit_code)
        handle = inst.handle
        log.warning("%s: %s: %s", inst.name, kind, reason)
        inst.move(Phase.FAILED, reason)
        if handle is not None:
            grace = HUNG_GRACE_S if kind == "Hung" else STOP_GRACE_S
            inst.cleanup_task = self._spawn(self._clean_up(inst, handle, failure, grace), f"clean-up-{inst.name}")

    async def _clean_up(self, inst: Instance, handle: Handle, failure: dict[str, Any], grace: float) -> None:
        """Stop what is left of a failed runtime (retrying a stop that fails), then record its exit and log tail.
        A stop that keeps failing leaves the handle in place, so the job stays reachable (``StopFailed``)."""
        manager = self.manager_of(handle)
        # A pod's log goes with the pod, so it is read before the stop; a local log file stays.
        pod_tail = None if manager.local else await manager.log_tail(handle, 20)
        try:
            code = await stop_retrying(manager, handle, grace, delays=self.stop_retry_delays, hurry=self._hurry,
                                       failed=lambda attempt, exc, delay: self._stop_attempt_failed(
                                           inst, handle, attempt, exc, delay))
        except StopFailed as exc:
            if failure["reason"] != "StopFailed":
                failure.update(reason="StopFailed", message=f"stopping {job_of(handle)} after {failure['reason']} "
                               f"failed: {exc.last}; its job may still run")
            self._save(inst)
            return
        tail = pod_tail if pod_tail is not None else await manager.log_tail(handle, 20)
        manager.forget(handle)
        if inst.handle is handle:
            inst.handle = None
        if failure.get("exitCode") is None and code is not None:
            failure["exitCode"] = code  # a process killed a moment ago is collected only now
            if failure["reason"] == "Crashed":
                failure["message"] = exit_text(code)
        failure["logTail"] = tail
        if failure["reason"] == "StopFailed":
            self._emit("Model", inst.name, "Normal", "Stopped", f"stopped {job_of(handle)} on a retry")
        self._save(inst)

    def _stop_attempt_failed(self, inst: Instance, handle: Handle, attempt: int, exc: Exception,
                             retry_in: float | None) -> None:
        then = f"retrying in {retry_in:g} s" if retry_in is not None else "giving up for now: the next stop retries"
        message = f"stopping {job_of(handle)} failed (attempt {attempt}): {exc}; {then}"
        log.warning("%s: %s", inst.name, message)
        self._emit("Model", inst.name, "Warning", "StopFailed", message, attempt=attempt, pid=pid_of(handle))

    def stop_failed(self, inst: Instance, handle: Handle, error: BaseException | str) -> None:
        """A stop of a runtime failed: keep its handle (its job may still run), say so (Failed, StopFailed: the
        record keeps the handle, so ``athanor down`` still reaches it) and retry the stop in a clean-up task.
        Not a failure of the runtime: it does not count towards a crash loop."""
        message = f"stopping {job_of(handle)} failed: {error}; its job may still run (retrying the stop)"
        failure = failures.record_stop_failure(inst, message)
        log.warning("%s: %s", inst.name, message)
        inst.move(Phase.FAILED, message)
        inst.cleanup_task = self._spawn(self._clean_up(inst, handle, failure, STOP_TIMEOUT_S), f"clean-up-{inst.name}")

    async def halt(self, inst: Instance, message: str) -> None:
        """Stop the process and end in Standby, or in Failed (``StopFailed``, the handle kept, the stop retried)
        when it could not be stopped: a waiter must never find it Stopping for good, and a job that may still run
        must never lose its handle."""
        inst.move(Phase.STOPPING, message)
        handle = inst.handle
        error: BaseException | str = "the stop was interrupted"
        try:
            if handle is not None:
                manager = self.manager_of(handle)
                await manager.stop(handle, STOP_TIMEOUT_S)
                manager.forget(handle)
                inst.handle = None
                self._write_spare_secret(inst, manager)
        except Exception as exc:  # noqa: BLE001 - recorded; the phase must still settle
            error = exc
        finally:
            if inst.handle is None:
                inst.move(Phase.STANDBY, "stopped")
            else:
                self.stop_failed(inst, inst.handle, error)
