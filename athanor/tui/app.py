"""The Textual app: thin. It routes between views (one Screen each) and runs the ``:`` commands; the main view
(``screens/main.py``) owns the connection to the daemon, and every other view reads it through ``session``.

Quitting changes nothing on the daemon: the TUI is a window onto it, never the owner of a process.
"""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding

from athanor.tui.client import AdminSession
from athanor.tui.downloads import Downloads
from athanor.tui.screens.describe import DescribeScreen
from athanor.tui.screens.dialogs import HelpScreen, command_prompt
from athanor.tui.screens.events import EventsScreen
from athanor.tui.screens.logs import LogsScreen
from athanor.tui.screens.main import MainScreen


class AthanorApp(App[None]):
    TITLE = "athanor"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "keys", key_display="?"),
        Binding("colon", "command", "command", key_display=":"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.main = MainScreen()
        self.downloads = Downloads(self)  # pulls go on whichever view is open

    @property
    def session(self) -> AdminSession | None:
        """The main view's connection to the daemon (None while there is none)."""
        return self.main.session

    def on_mount(self) -> None:
        self.push_screen(self.main)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def action_command(self) -> None:
        self.push_screen(command_prompt(), self.run_command)

    def run_command(self, text: str | None) -> None:
        """``:models``, ``:events``, ``:telemetry``, ``:search [QUERY]``, ``:downloads``, ``:logs [MODEL]``,
        ``:describe [MODEL]``, ``:help``, ``:q``."""
        text = (text or "").lstrip(":")
        if not text:
            return
        verb, _, arg = text.partition(" ")
        arg = arg.strip()
        if verb in ("q", "q!", "quit", "exit"):
            self.exit()
        elif verb in ("models", "model", "mo", "m"):
            self._to_main()
        elif verb in ("events", "event", "ev"):
            self._to_main()
            self.push_screen(EventsScreen())
        elif verb in ("search", "s"):
            self.open_search(arg)
        elif verb in ("downloads", "dl"):
            self.open_downloads()
        elif verb in ("telemetry", "tel", "t"):
            self._to_main()
            self.main.action_telemetry()
        elif verb in ("logs", "log"):
            self._with_model(arg, self.open_logs)
        elif verb in ("describe", "desc"):
            self._with_model(arg, self.open_describe)
        elif verb == "help":
            self.action_help()
        else:
            self.notify(f"unknown command :{verb} (try :models, :events, :telemetry, :search, :downloads, :logs, :describe, :q)", severity="warning")

    def _to_main(self) -> None:
        while len(self.screen_stack) > 1 and self.screen is not self.main:
            self.pop_screen()

    def _with_model(self, name: str, opener) -> None:
        name = name or (self.main.query_one("#models").selected or "")  # type: ignore[attr-defined]
        if not name:
            self.notify("no model selected", severity="warning")
            return
        self._to_main()
        opener(name)

    def open_search(self, query: str = "") -> None:
        from athanor.tui.screens.search import SearchScreen

        self._to_main()
        self.push_screen(SearchScreen(query))

    def open_downloads(self) -> None:
        from athanor.tui.screens.downloads import DownloadsScreen

        self._to_main()
        self.push_screen(DownloadsScreen())

    def open_logs(self, name: str) -> None:
        self.push_screen(LogsScreen(name))

    def open_describe(self, name: str) -> None:
        self.push_screen(DescribeScreen(name))
