"""Every event the daemon holds, then each new one (``:events``): the main view's feed, full screen."""

from __future__ import annotations

import asyncio

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Log, Static

from athanor.tui import format as fmt


class EventsScreen(Screen[None]):
    VIEW = "events"
    BINDINGS = [Binding("escape", "app.pop_screen", "back")]
    DEFAULT_CSS = """
    EventsScreen #title { background: $boost; padding: 0 1; height: 1; }
    EventsScreen Log { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static("events", id="title")
        yield Log(max_lines=2000, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(Log).focus()
        self.stream()

    @work(exclusive=True, group="events-view")
    async def stream(self) -> None:
        from athanor import heartbeat
        from athanor.tui.client import AdminUnavailable

        log = self.query_one(Log)
        since: int | None = None
        while True:
            session = self.app.session  # type: ignore[attr-defined]
            if session is not None:
                path = "/events?follow=1" + (f"&since={since}" if since is not None else "")
                try:
                    async for kind, event in session.stream(path, heartbeat.read_timeout()):
                        if kind == "message" and isinstance(event, dict):
                            since = event.get("seq", since)
                            log.write_line(fmt.event_line(event))
                except AdminUnavailable:
                    pass
            await asyncio.sleep(1.0)  # retry interval while the gateway is away
