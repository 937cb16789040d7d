"""A version counter of what the admin API's status shows (phases, in-flight and waiting counts, instances), and a
way to wait for its next change: the status feed (``GET /athanor/v1/status?follow=1``) follows it instead of
polling.

The request path bumps it twice per request (in flight, then done), so a bump is an add and one attribute test:
the event that wakes followers exists only while someone waits on it.
"""

from __future__ import annotations

import asyncio


class Changes:
    __slots__ = ("_event", "version")

    def __init__(self) -> None:
        self.version = 0
        self._event: asyncio.Event | None = None

    def bump(self) -> None:
        """Something the status shows changed: wake every follower."""
        self.version += 1
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def after(self, version: int) -> int:
        """Wait until the version is past ``version``; returns the version then."""
        while self.version == version:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        return self.version
