"""Downloads (``D``): the pulls of this TUI session with their progress, updated in place as they advance.

The pulls themselves live in the app's ``Downloads`` (athanor/tui/downloads.py), not here: leaving this view
changes nothing, and coming back shows where each one is. Rows are keyed by pull and updated cell by cell when a
``DownloadChanged`` arrives (and every ``CATCH_UP_S``, for progress posted less often than it changed), so nothing
is rebuilt and the cursor stays where it is.
"""

from __future__ import annotations

from rich.progress_bar import ProgressBar
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from athanor.tui.downloads import DOWNLOADING, FAILED, QUEUED, REGISTERED, Download, DownloadChanged, downloads_of
from athanor.tui.screens.dialogs import ConfirmScreen

BAR_WIDTH = 30
CATCH_UP_S = 0.5  # the view also reads every pull this often: progress posted less often than it changed shows
COLUMNS: tuple[tuple[str, str], ...] = (
    ("repo", "REPO"), ("state", "STATE"), ("bar", "PROGRESS"), ("bytes", "BYTES"), ("detail", "DETAIL"),
)
EMPTY_TEXT = "no pulls in this session: S searches the Hub, and Enter on a result pulls it"


def texts(download: Download) -> dict[str, str]:
    """A pull's text cells: its state, how much is done, and what it is doing or why it failed."""
    from athanor.views import human_bytes

    fraction = download.fraction
    if download.state == QUEUED or (download.state == DOWNLOADING and not download.files):
        size = "-"
    elif download.total:
        size = f"{human_bytes(download.done) if download.done else '0'}/{human_bytes(download.total)}"
        size += f" {int((fraction or 0) * 100)}%"
    elif download.state != FAILED:
        size = "in the cache"
    else:
        size = "-"
    if download.state == REGISTERED:
        detail = ", ".join(f"model/{name}" for name in download.models)
    elif download.state == FAILED:
        detail = download.error or "failed"
    elif download.cancelling:
        detail = "cancelling (at the next chunk it receives)"
    elif download.state == DOWNLOADING:
        detail = download.file or ("starting" if download.files else "listing its files, checking the fit")
    else:
        detail = "waiting for the pull before it"
    return {"repo": download.repo, "state": download.state, "bytes": size, "detail": detail}


def bar(download: Download) -> ProgressBar:
    fraction = download.fraction
    if download.state == FAILED:
        return ProgressBar(total=100, completed=int((fraction or 0) * 100), width=BAR_WIDTH,
                           style="bar.back", complete_style="red", finished_style="red")
    return ProgressBar(total=100, completed=(fraction or 0) * 100, width=BAR_WIDTH,
                       pulse=download.state == DOWNLOADING and fraction is None)


class DownloadsScreen(Screen[None]):
    VIEW = "downloads"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("x", "cancel", "cancel pull"),
    ]
    DEFAULT_CSS = """
    DownloadsScreen #title { background: $boost; padding: 0 1; height: 1; }
    DownloadsScreen DataTable { height: 1fr; }
    DownloadsScreen #detail { height: auto; max-height: 8; padding: 0 1; border-top: solid $primary; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.shown: dict[int, Download] = {}  # the snapshot each row shows, by pull id

    def compose(self) -> ComposeResult:
        yield Static("downloads: the pulls of this session (they go on in any view)", id="title")
        yield DataTable(cursor_type="row", zebra_stripes=False, id="downloads")
        yield Static(EMPTY_TEXT, id="detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key, width=BAR_WIDTH if key == "bar" else None)
        downloads_of(self.app).watch(self)
        self.catch_up()
        self.set_interval(CATCH_UP_S, self.catch_up)
        table.focus()

    def catch_up(self) -> None:
        """Show every pull as it is now (cells that did not change are left alone)."""
        for download in downloads_of(self.app).items:
            self.show(download)

    def on_download_changed(self, message: DownloadChanged) -> None:
        current = downloads_of(self.app).get(message.download.id)  # messages may arrive after newer ones
        self.show(current or message.download)

    def show(self, download: Download) -> None:
        """Add the pull's row, or change the cells that changed."""
        table = self.query_one(DataTable)
        before = self.shown.get(download.id)
        if before == download:
            return
        cells = texts(download)
        key = str(download.id)
        if before is None:
            table.add_row(*(bar(download) if k == "bar" else Text(cells[k]) for k, _ in COLUMNS), key=key)
        else:
            old = texts(before)
            for k in cells:
                if old[k] != cells[k]:
                    table.update_cell(key, k, Text(cells[k]), update_width=True)
            if (before.state, before.done, before.total) != (download.state, download.done, download.total):
                table.update_cell(key, "bar", bar(download))
        self.shown[download.id] = download
        self._detail()

    @property
    def selected(self) -> Download | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - a cursor past the rows
            return None
        return self.shown.get(int(key)) if key else None

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._detail()

    def _detail(self) -> None:
        """Under the table: the selected pull's whole story (fit verdict, notes, error)."""
        download = self.selected
        if download is None:
            self.query_one("#detail", Static).update(EMPTY_TEXT)
            return
        lines = [f"{download.repo}: {download.state}"]
        lines += [f"  {note}" for note in download.notes]
        if download.error:
            lines.append(f"  {download.error}")
        self.query_one("#detail", Static).update(Text("\n".join(lines)))

    def action_cancel(self) -> None:
        download = self.selected
        if download is None or not download.active:
            self.notify("no pull under way here to cancel", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                downloads_of(self.app).cancel(download.id)

        self.app.push_screen(ConfirmScreen(f"cancel the pull of {download.repo}? (nothing is registered)"), answered)
