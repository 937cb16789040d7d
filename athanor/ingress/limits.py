"""The Gateway's request limits, followed while the gateway serves: ``apply`` changes them without a restart.

``limits.maxRequestBytes`` bounds each request body; ``limits.upstreamIdleTimeout`` bounds how long a runtime may
send nothing (it is the pool's ``idle_timeout``, which each request takes as it is sent). Both are looked up once
per request in the Gateway spec the controller keeps (``controller.gateway()``: one stat of the store, re-read
only when it changed); the duration is parsed only when its text changes.
"""

from __future__ import annotations

from typing import Any

from athanor.controller.controller import Controller
from athanor.ingress.upstream import UpstreamPool
from athanor.quantities import parse_duration


class Limits:
    """The limits in force; ``follow()`` brings them up to date with the spec."""

    __slots__ = ("_controller", "_idle_text", "_pool", "_seen", "max_body")

    def __init__(self, controller: Controller, pool: UpstreamPool):
        self._controller = controller
        self._pool = pool
        self._seen: dict[str, Any] | None = None
        self._idle_text: str | None = None
        self.max_body = 0
        self.follow()

    def follow(self) -> int:
        """The body limit for a request arriving now; on the way, the pool gets the idle limit now in the spec."""
        spec = self._controller.gateway()["limits"]
        if spec is not self._seen:  # the spec was re-read (any apply): compare the values themselves
            self._seen = spec
            self.max_body = int(spec["maxRequestBytes"])  # JSON Schema's integer admits 1048576.0
            idle = spec["upstreamIdleTimeout"]
            if idle != self._idle_text:
                self._idle_text = idle
                self._pool.idle_timeout = parse_duration(idle)
        return self.max_body
