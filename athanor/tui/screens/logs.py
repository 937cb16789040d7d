"""Full-screen logs of one model, followed across its restarts, with k9s's toggles: follow (stay at the end),
wrap, and timestamps (when each line arrived here). Lines are written in the batches the daemon sends them in,
never one repaint per line."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static

KEEP_LINES = 5000


class LogsScreen(Screen[None]):
    VIEW = "logs"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("f", "follow", "follow"),
        Binding("w", "wrap", "wrap"),
        Binding("t", "timestamps", "timestamps"),
    ]
    DEFAULT_CSS = """
    LogsScreen #title { background: $boost; padding: 0 1; height: 1; }
    LogsScreen RichLog { height: 1fr; }
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = name
        self.follow, self.wrap, self.stamps = True, False, False
        self.lines: deque[tuple[float, str]] = deque(maxlen=KEEP_LINES)
        self._partial = ""

    def compose(self) -> ComposeResult:
        yield Static("", id="title")
        yield RichLog(wrap=False, auto_scroll=True, max_lines=KEEP_LINES, markup=False, highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self._title()
        self.query_one(RichLog).focus()
        self.stream()

    def _title(self) -> None:
        on = {True: "on", False: "off"}
        self.query_one("#title", Static).update(
            f"logs: {self.model}   follow {on[self.follow]}   wrap {on[self.wrap]}   timestamps {on[self.stamps]}")

    def _stamped(self, stamp: float, line: str) -> str:
        return f"{time.strftime('%H:%M:%S', time.localtime(stamp))} {line}" if self.stamps else line

    def _add(self, text: str) -> None:
        text = self._partial + text
        *complete, self._partial = text.split("\n")
        now = time.time()
        batch = [(now, line) for line in complete]
        self.lines.extend(batch)
        if batch:
            self.query_one(RichLog).write("\n".join(self._stamped(*item) for item in batch),
                                          scroll_end=self.follow)

    def _redraw(self) -> None:
        log = self.query_one(RichLog)
        log.clear()
        log.wrap, log.auto_scroll = self.wrap, self.follow
        if self.lines:
            log.write("\n".join(self._stamped(*item) for item in self.lines), scroll_end=self.follow)
        self._title()

    def action_follow(self) -> None:
        self.follow = not self.follow
        self.query_one(RichLog).auto_scroll = self.follow
        if self.follow:
            self.query_one(RichLog).scroll_end(animate=False)
        self._title()

    def action_wrap(self) -> None:
        self.wrap = not self.wrap
        self._redraw()

    def action_timestamps(self) -> None:
        self.stamps = not self.stamps
        self._redraw()

    @work(exclusive=True, group="logs-view")
    async def stream(self) -> None:
        from athanor import heartbeat
        from athanor.tui.client import AdminUnavailable, model_path

        while True:
            session = self.app.session  # type: ignore[attr-defined]
            if session is not None:
                try:
                    async for _, piece in session.stream(f"{model_path(self.model)}/logs?follow=1&lines=500",
                                                         heartbeat.read_timeout()):
                        self._add(piece.get("text", "") if isinstance(piece, dict) else str(piece))
                except AdminUnavailable as exc:
                    self.query_one("#title", Static).update(f"logs: {self.model}   ({exc}; trying again)")
            await asyncio.sleep(1.0)  # retry interval while the gateway is away
