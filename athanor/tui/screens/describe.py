"""Describe: one model's JSON from the admin API (``GET /models/{model}``), rendered as YAML to read."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static


class DescribeScreen(Screen[None]):
    VIEW = "describe"
    BINDINGS = [Binding("escape", "app.pop_screen", "back"), Binding("ctrl+r", "reload", "reload")]
    DEFAULT_CSS = """
    DescribeScreen #title { background: $boost; padding: 0 1; height: 1; }
    DescribeScreen VerticalScroll { height: 1fr; padding: 0 1; }
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = name
        self.text = ""  # the YAML shown, once loaded

    def compose(self) -> ComposeResult:
        yield Static(f"describe: {self.model}", id="title")
        with VerticalScroll():
            yield Static("loading...", id="body")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
        self.load()

    def action_reload(self) -> None:
        self.load()

    @work(exclusive=True, group="describe")
    async def load(self) -> None:
        import yaml
        from rich.syntax import Syntax

        from athanor.tui.client import AdminUnavailable, model_path

        body = self.query_one("#body", Static)
        session = self.app.session  # type: ignore[attr-defined]
        if session is None:
            body.update("not attached to a gateway")
            return
        try:
            model = await session.get(model_path(self.model))
        except AdminUnavailable as exc:
            body.update(f"cannot describe {self.model}: {exc}")
            return
        self.text = yaml.safe_dump(model, sort_keys=False, allow_unicode=True, width=110)
        body.update(Syntax(self.text, "yaml", theme="ansi_dark", word_wrap=True))
