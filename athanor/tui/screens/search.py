"""Search (``S``): Hub repos as ``athanor search QUERY --sort fit`` lists them, best fit first, and Enter pulls one.

The search is the CLI's library call (``athanor.hub.search``), run off the event loop in a worker, so typing never
waits for the Hub. A pull asks first, then goes to the app's ``Downloads`` (athanor/tui/downloads.py), which keeps
it going after this view is left; the downloads view (``D``) shows its progress.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from athanor.tui.downloads import downloads_of
from athanor.tui.screens.dialogs import ConfirmScreen

if TYPE_CHECKING:
    from athanor.hub import Row

LIMIT = 30  # rows a search asks for (the CLI's default is 20)
SORT = "fit"  # comfortable, tight, risky, then unknown; by downloads within a band
COLUMNS: tuple[tuple[str, str], ...] = (
    ("repo", "REPO"), ("format", "FORMAT"), ("size", "SIZE"), ("quant", "QUANT"), ("fit", "FIT"),
    ("downloads", "DOWNLOADS"),
)


def cells(row: Row) -> dict[str, str]:
    """A search row's cells, as ``athanor search`` prints them (gated repos marked: pulling them needs HF_TOKEN)."""
    from athanor.views import human_bytes, human_count

    quant = (row.quant or "-") + (" +mmproj" if row.projector else "")
    return {"repo": row.repo + (" (gated)" if row.gated else ""), "format": row.format,
            "size": human_bytes(row.size_bytes), "quant": quant, "fit": row.fit or "-",
            "downloads": human_count(row.downloads)}


class Results(DataTable[str]):
    """The search's rows, keyed by repo; Enter (``select_cursor``) on one asks to pull it."""

    BINDINGS = [Binding("enter", "select_cursor", "pull")]


class SearchScreen(Screen[None]):
    VIEW = "search"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("enter", "pull", "pull", show=False),  # on a result (the table's own Enter); listed by ?
        Binding("slash", "focus_query", "query", key_display="/"),
        Binding("ctrl+r", "search", "search again"),
    ]
    DEFAULT_CSS = """
    SearchScreen #title { background: $boost; padding: 0 1; height: 1; }
    SearchScreen #query { margin: 0 0; }
    SearchScreen Results { height: 1fr; }
    SearchScreen #status { height: auto; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, query: str = "") -> None:
        super().__init__()
        self.query_text = query.strip()
        self.rows: dict[str, Row] = {}  # the results shown, by repo
        self.searching = False  # a search is under way (the newest one asked for)
        self._searches = 0  # searches asked for: only the newest one's end clears ``searching``

    def compose(self) -> ComposeResult:
        yield Static("search the Hub (sorted by fit on this machine)", id="title")
        yield Input(value=self.query_text, placeholder="a repo or model name, e.g. qwen3 or bartowski/...", id="query")
        yield Results(cursor_type="row", zebra_stripes=False, id="results")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(Results)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        if self.query_text:
            self.search(self.query_text)
        else:
            self._status("type a query and press Enter")
            self.query_one("#query", Input).focus()

    def _status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    @on(Input.Submitted, "#query")
    def submitted(self, event: Input.Submitted) -> None:
        self.search(event.value.strip())

    def action_search(self) -> None:
        self.search(self.query_one("#query", Input).value.strip())

    def action_focus_query(self) -> None:
        self.query_one("#query", Input).focus()

    @work(exclusive=True, group="search")
    async def search(self, query: str) -> None:
        """The CLI's search in a thread; a newer search replaces this one (its answer is then dropped)."""
        from athanor import hub
        from athanor.errors import AthanorError

        self.query_text = query
        self._searches += 1
        mine = self._searches
        self.searching = True
        what = f"'{query}'" if query else "the most downloaded repos"
        self._status(f"searching the Hub for {what}...")
        try:
            rows = await asyncio.to_thread(hub.search, query or None, sort=SORT, limit=LIMIT)
        except AthanorError as exc:
            self._status(f"search failed: {exc}")
            self.notify(str(exc), title="search", severity="error")
            return
        finally:
            if mine == self._searches:  # a search replaced by a newer one leaves the flag to that one
                self.searching = False
        self._show(rows)
        if rows:
            count = f"{len(rows)} repo{'s' if len(rows) != 1 else ''}"
            self._status(f"{count} for {what}, best fit first; Enter pulls the one under the cursor")
            self.query_one(Results).focus()
        else:
            self._status(f"no repo athanor can serve matches {what}")

    def _show(self, rows: list[Row]) -> None:
        table = self.query_one(Results)
        table.clear()
        self.rows = {}
        for row in rows:
            if row.repo in self.rows:
                continue
            self.rows[row.repo] = row
            shown = cells(row)
            table.add_row(*(shown[key] for key, _ in COLUMNS), key=row.repo)

    @property
    def selected(self) -> Row | None:
        """The result under the cursor (None with no results)."""
        table = self.query_one(Results)
        if not table.row_count:
            return None
        try:
            return self.rows.get(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or "")
        except Exception:  # noqa: BLE001 - a cursor left past the rows
            return None

    @on(DataTable.RowSelected, "#results")
    def row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_pull()

    def action_pull(self) -> None:
        """Ask, then hand the pull to the app's downloads (it goes on whatever view the user is in)."""
        from athanor.views import human_bytes

        row = self.selected
        if row is None:
            return
        what = ", ".join(x for x in (row.quant, human_bytes(row.size_bytes) if row.size_bytes else None,
                                     f"{row.fit} fit" if row.fit else None) if x)
        gated = "\n(gated: the Hub sends its files only with an HF_TOKEN that was granted access)" if row.gated else ""
        question = f"pull {row.repo}{f' ({what})' if what else ''}?{gated}"

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            download = downloads_of(self.app).pull(row.repo)
            self.notify(f"pulling {download.repo}: D shows its progress", title="pull")

        self.app.push_screen(ConfirmScreen(question), answered)
