"""A request's hold on a model: what the ingress gets from ``controller.use(name)``.

The data flows one way. The handler asks once, ``controller.use(name)``, which admits the request or refuses it
at once (429 over the queue limit, 503 for a model that cannot run) before any response header is sent. The
lease then answers the handler's two questions, "is it ready yet?" (``ready``, so a streaming client can be kept
alive while it loads) and "where do I send it?" (``acquire``), and takes its one report, "the runtime failed me"
(``runtime_died``), which the controller turns into at most one crash per runtime incarnation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from athanor.controller.instance import Instance


class Keeper(Protocol):
    """What a lease needs from whoever runs the models (the Controller), and no more: the lease does not import
    the controller, which imports it."""

    def serving(self, inst: Instance) -> bool: ...

    async def make_ready(self, inst: Instance) -> None: ...

    async def runtime_died(self, inst: Instance, incarnation: int) -> bool: ...

    def runtime_errored(self, inst: Instance, incarnation: int, status: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one request goes: a runtime incarnation at an address (loopback, or a pod's under Kubernetes)."""

    name: str
    host: str
    port: int
    served_model: str
    incarnation: int
    max_connections: int
    secret: str | None = field(default=None, repr=False)  # sent as a Bearer token: the runtime answers nothing else
    socket: str | None = None  # a Unix socket to reach it by instead of host:port (``LaunchSpec.socket``)


def upstream_of(inst: Instance) -> Upstream:
    """Where ``inst``'s requests go now: made once per launch and incarnation, not per request (a frozen dataclass
    costs 1.5 us to build)."""
    launch = inst.launch
    assert launch is not None
    made = inst.upstream
    if made is not None and made[0] is launch and made[1].incarnation == inst.incarnation:
        return made[1]
    upstream = Upstream(inst.name, launch.host, launch.port, launch.served_model, inst.incarnation,
                        launch.max_connections, launch.secret, launch.socket)
    inst.upstream = (launch, upstream)
    return upstream


class Lease:
    """Held for one request (``async with``): counted as waiting until acquired, then as in flight."""

    __slots__ = ("_controller", "_instance", "_reported", "_upstream", "_waiting")

    def __init__(self, controller: Keeper, instance: Instance, *, waiting: bool):
        """``waiting``: the model does not serve now, so the request counts as waiting from the start."""
        self._controller = controller
        self._instance = instance
        self._waiting = False
        self._upstream: Upstream | None = None
        self._reported = False
        if waiting:
            self._wait()

    @property
    def ready(self) -> bool:
        """Whether the request can go to the runtime now, without waiting for a start or a swap."""
        return self._controller.serving(self._instance)

    async def acquire(self) -> Upstream:
        """Wait until the model serves (sharing a start, waiting for a swap), then count this request in flight.
        Called again after a failure, it lets go of the old runtime and waits for the next one (a retry)."""
        inst = self._instance
        self._leave()
        if not self._controller.serving(inst):
            self._wait()
            await self._controller.make_ready(inst)
        return self._enter()

    @staticmethod
    def in_flight(controller: Keeper, instance: Instance) -> Lease:
        """A lease already acquired, on a model the caller found serving just now (``Controller.use_now``). (Not a
        classmethod: compiled, ``cls(...)`` is a generic call, a tenth of the lease's cost.)"""
        lease = Lease(controller, instance, waiting=False)
        instance.enter()
        lease._upstream = upstream_of(instance)
        return lease

    @property
    def upstream(self) -> Upstream | None:
        """Where the request goes, once acquired."""
        return self._upstream

    def _enter(self) -> Upstream:
        inst = self._instance
        self._unwait()
        inst.enter()
        self._reported = False
        self._upstream = upstream_of(inst)
        return self._upstream

    async def runtime_died(self) -> bool:
        """Report that the runtime failed this request (unreachable, or the connection broke); True when it is
        dead, in which case the crash is recorded, once, and the next ``acquire`` starts a new one."""
        assert self._upstream is not None
        return await self._controller.runtime_died(self._instance, self._upstream.incarnation)

    def answered(self, status: int) -> None:
        """The runtime answered this request with HTTP ``status``: a run of server errors from a runtime that is
        otherwise alive makes the controller test it with a generation (and restart it if that fails too)."""
        assert self._upstream is not None
        inst = self._instance
        if status >= 500 and status != 501:  # 501: a feature it was not started with, not a broken runtime
            self._controller.runtime_errored(inst, self._upstream.incarnation, status)
        elif inst.error_streak:
            inst.error_streak = 0

    def used(self, tokens: int | None) -> None:
        """The runtime's answer is complete: ``tokens`` (its prompt and completion, as the runtime reported them;
        None: not reported) is the most this request may have left in a slot. A request in flight that never says
        counts as not known (``Instance.slot_tokens``)."""
        if self._upstream is not None:
            self._reported = True
            self._instance.slot_used(tokens, self._upstream.incarnation)

    def release(self) -> None:
        self._leave()
        self._unwait()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def _wait(self) -> None:
        if not self._waiting:
            self._waiting = True
            self._instance.add_waiting(1)

    def _unwait(self) -> None:
        if self._waiting:
            self._waiting = False
            self._instance.add_waiting(-1)

    def _leave(self) -> None:
        if self._upstream is not None:
            if not self._reported:
                self._instance.slot_used(None, self._upstream.incarnation)
            self._upstream = None
            self._instance.leave()
