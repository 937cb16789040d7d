"""The telemetry view (``t``): the models the user marked side by side over their last N requests, and a sparkline
of each one's decode tokens/s, request by request. Everything is the admin API's (``/telemetry/compare`` and
``/telemetry``); the figures are the daemon's, this view only lays them out.

The table is laid out once per set of models (and again when a column's width changes), then updated cell by cell,
so a refresh never flickers; the fetch runs in a worker, so a slow daemon delays the figures, never the keyboard.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from typing import Any

from rich.cells import cell_len
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Sparkline, Static

REFRESH_S = 3.0  # how often the figures are fetched again while the view is open
WINDOWS = (20, 100, 500)  # the last N requests per model `n`/`N` step through
DEFAULT_WINDOW = 100  # the CLI's `telemetry compare --last` default
DISCOVER_LIMIT = 1000  # with no marked models: the models among this many newest records are shown
DASH = "-"

# (column key, header, field of a compare answer, how it is shown)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "MODEL", "model"), ("requests", "REQS", "requests"), ("errors", "ERRS", "errors"),
    ("ttft50", "TTFT50", "ttftP50"), ("ttft95", "TTFT95", "ttftP95"),
    ("decode", "DECODE/S", "decodeTokensPerSecond"), ("prefill", "PREFILL/S", "prefillTokensPerSecond"),
    ("prompt", "PROMPT", "promptTokens"), ("completion", "COMPL", "completionTokens"),
)
EMPTY_TEXT = ("no requests recorded yet\n\n"
              "Each request the gateway answers is recorded here: tokens,\n"
              "TTFT and tokens/s. Send one to a model, then press r.")


def cell(field: str, value: Any) -> str:
    """A compare figure as the table shows it: counts whole, TTFT in ms, rates with one decimal; "-" when the
    daemon has none (no streamed request to time, no figure reported)."""
    if value is None:
        return DASH
    if field == "model":
        return str(value)
    if field.startswith("ttft"):
        return f"{value * 1000:.0f}ms" if isinstance(value, (int, float)) else DASH
    if field.endswith("TokensPerSecond"):
        return f"{value:.1f}" if isinstance(value, (int, float)) else DASH
    return str(value)


def row_cells(model: str, figures: dict[str, Any]) -> list[str]:
    """A model's row of the table from its compare answer (its name alone while it has none)."""
    return [cell(field, figures.get(field, model if field == "model" else None)) for _, _, field in COLUMNS]


def column_widths(rows: Iterable[list[str]]) -> list[int]:
    """Each column's width in cells: its header's or its widest value's."""
    widths = [cell_len(header) for _, header, _ in COLUMNS]
    for values in rows:
        widths = [max(width, cell_len(value)) for width, value in zip(widths, values, strict=True)]
    return widths


def decode_series(items: list[dict[str, Any]]) -> list[float]:
    """Decode tokens/s of records the API lists newest first, oldest first for the sparkline; requests without a
    figure (an error, nothing generated) leave no point."""
    return [float(r["decodeTokensPerSecond"]) for r in reversed(items)
            if isinstance(r.get("decodeTokensPerSecond"), (int, float))]


def models_in(items: list[dict[str, Any]]) -> list[str]:
    """The models that have records among ``items``, by name (a stable order: the rows never jump around)."""
    return sorted({str(r["model"]) for r in items if r.get("model")})


class TelemetryScreen(Screen[None]):
    VIEW = "telemetry"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("r", "refresh_now", "refresh"),
        Binding("n", "window(1)", "window+"),
        Binding("N", "window(-1)", "window-", key_display="N"),
        Binding("c", "clear", "clear"),
    ]
    DEFAULT_CSS = """
    TelemetryScreen #title { background: $boost; padding: 0 1; height: 1; }
    TelemetryScreen #figures { height: auto; max-height: 50%; }
    TelemetryScreen #sparks { height: 1fr; padding: 0 1; }
    TelemetryScreen .spark { height: auto; }
    TelemetryScreen .spark-label { height: 1; margin-top: 1; }
    TelemetryScreen Sparkline { height: 2; }
    TelemetryScreen #empty { display: none; padding: 1 2; height: auto; }
    TelemetryScreen.empty #empty { display: block; }
    TelemetryScreen.empty #figures, TelemetryScreen.empty #sparks { display: none; }
    """

    def __init__(self, models: list[str] | None = None) -> None:
        """``models``: the ones to compare (the user's marks), or None for every model that has records."""
        super().__init__()
        self.chosen = list(models) if models else None
        self.window = DEFAULT_WINDOW
        self.shown: list[str] = []  # the models in the table, in its row order
        self.figures: dict[str, dict[str, Any]] = {}  # model -> its last compare answer
        self.series: dict[str, list[float]] = {}  # model -> decode tokens/s, oldest first
        self.problem = ""  # why the last fetch failed ("" when it did not)
        self.loaded = 0  # fetches completed: tests and the title wait on it
        self._sparks: dict[str, tuple[Label, Sparkline]] = {}  # model -> its label and sparkline
        self._spark_texts: dict[str, str] = {}
        self._fetching = False

    def compose(self) -> ComposeResult:
        yield Static("", id="title")
        yield Static(EMPTY_TEXT, id="empty", markup=False)
        yield DataTable(id="figures", cursor_type="row", zebra_stripes=True)
        yield VerticalScroll(id="sparks")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#figures", DataTable)
        self._lay_out(table, {}, column_widths([]))
        table.focus()
        self._title()
        self.fetch()
        self.set_interval(REFRESH_S, self._tick)

    def _title(self) -> None:
        which = "marked models" if self.chosen else "all models"
        text = f"telemetry: {which}, last {self.window} requests each"
        if self.problem:
            text = f"telemetry: {self.problem} (trying again)"
        self.query_one("#title", Static).update(text)

    def _tick(self) -> None:
        if not self._fetching:  # a slow fetch is left to finish, not restarted every few seconds
            self.fetch()

    def action_refresh_now(self) -> None:
        self.fetch()

    def action_window(self, step: int) -> None:
        index = WINDOWS.index(self.window) if self.window in WINDOWS else 1
        self.window = WINDOWS[max(0, min(len(WINDOWS) - 1, index + step))]
        self._title()
        self.fetch()

    def action_clear(self) -> None:
        from athanor.tui.screens.dialogs import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes:
                self.clear_records()

        self.app.push_screen(ConfirmScreen("Delete every telemetry record (all models)?"), answered)

    @work(exclusive=True, group="telemetry-clear")
    async def clear_records(self) -> None:
        from athanor.tui.client import AdminUnavailable

        session = self.app.session  # type: ignore[attr-defined]
        if session is None:
            self.notify("not attached to a gateway", severity="warning")
            return
        try:
            answer = await session.delete("/telemetry")
        except AdminUnavailable as exc:
            self.notify(f"cannot clear telemetry: {exc}", severity="error")
            return
        deleted = answer.get("deleted") if isinstance(answer, dict) else None
        self.notify(f"deleted {deleted if deleted is not None else 'the'} telemetry records")
        self.fetch()

    @work(exclusive=True, group="telemetry")
    async def fetch(self) -> None:
        from athanor.tui.client import AdminUnavailable

        session = self.app.session  # type: ignore[attr-defined]
        if session is None:
            self.problem = "not attached to a gateway"
            self._title()
            return
        self._fetching = True
        try:
            models = self.chosen
            if models is None:
                models = models_in((await session.get(f"/telemetry?limit={DISCOVER_LIMIT}"))["items"])
            figures = []
            series: dict[str, list[float]] = {}
            if models:
                query = urllib.parse.urlencode([("model", m) for m in models] + [("last", self.window)])
                figures = (await session.get(f"/telemetry/compare?{query}"))["models"]
                for model in models:
                    query = urllib.parse.urlencode({"model": model, "limit": self.window})
                    series[model] = decode_series((await session.get(f"/telemetry?{query}"))["items"])
        except (AdminUnavailable, KeyError, TypeError) as exc:
            self.problem = str(exc) if isinstance(exc, AdminUnavailable) else f"unexpected answer ({exc})"
            self._title()
            return
        finally:
            self._fetching = False
        self.problem = ""
        await self._show(models, figures, series)
        self.loaded += 1
        self._title()

    async def _show(self, models: list[str], figures: list[dict[str, Any]], series: dict[str, list[float]]) -> None:
        """Put the answers on screen: the table is laid out again only when the set of models or a column's
        width changes, and sparklines are added or removed only with the models; otherwise only the cells and
        sparkline data that changed are updated."""
        self.figures = {m: f for m, f in zip(models, figures, strict=False)}
        self.series = series
        rows = {model: row_cells(model, self.figures.get(model, {})) for model in models}
        table = self.query_one("#figures", DataTable)
        widths = column_widths(rows.values())
        if models != self.shown or widths != [column.width for column in table.ordered_columns]:
            self._lay_out(table, rows, widths)
        else:
            for model, values in rows.items():
                for (key, _, _), value in zip(COLUMNS, values, strict=True):
                    if table.get_cell(model, key) != value:
                        table.update_cell(model, key, value)
        if models != self.shown:
            sparks = self.query_one("#sparks", VerticalScroll)
            await sparks.remove_children()
            self._sparks = {model: (Label(model, classes="spark-label", markup=False), Sparkline([]))
                            for model in models}
            await sparks.mount_all(Vertical(*pair, classes="spark") for pair in self._sparks.values())
            self.shown = list(models)
        for model in models:
            self._spark(model, series.get(model, []))
        self.set_class(not any((f.get("requests") or 0) for f in figures), "empty")

    def _lay_out(self, table: DataTable, rows: dict[str, list[str]], widths: list[int]) -> None:
        """The table again, whole, with each column as wide as its widest cell. The widths are set here rather
        than left to the table: Textual's DataTable widens a column on its next idle, and a row drawn before then
        stayed drawn at the old width (a model's name cut short) until its cells next changed."""
        cursor = table.cursor_row
        table.clear(columns=True)
        for (key, header, _), width in zip(COLUMNS, widths, strict=True):
            table.add_column(header, key=key, width=width)
        for model, values in rows.items():
            table.add_row(*values, key=model)
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1))

    def _spark(self, model: str, points: list[float]) -> None:
        label, spark = self._sparks[model]
        if points:
            text = (f"{model}   decode tok/s over {len(points)} requests: latest {points[-1]:.1f}, "
                    f"min {min(points):.1f}, max {max(points):.1f}")
        else:
            text = f"{model}   no decode figures yet"
        if self._spark_texts.get(model) != text:
            self._spark_texts[model] = text
            label.update(text)
        if list(spark.data or []) != points:
            spark.data = points

    def sparkline(self, model: str) -> Sparkline | None:
        """The sparkline of ``model`` (None when it is not shown): tests read its data."""
        pair = self._sparks.get(model)
        return pair[1] if pair else None
