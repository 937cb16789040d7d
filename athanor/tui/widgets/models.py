"""The model table: one keyed row per model, updated cell by cell in place (never cleared and rebuilt), so the
cursor stays on its row and nothing flickers while the daemon's state changes underneath."""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from athanor.tui import format as fmt


class ModelTable(DataTable[Text]):
    """Rows keyed by model name, in name order; ``show`` takes the daemon's latest view of every model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self._cells: dict[str, dict[str, str]] = {}

    def on_mount(self) -> None:
        for key, label in fmt.COLUMNS:
            self.add_column(label, key=key)

    @property
    def selected(self) -> str | None:
        """The model under the cursor, or None when the table is empty."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - a cursor past the rows after a removal
            return None

    def cell(self, name: str, column: str) -> str | None:
        """What the table shows now for ``name``'s ``column`` (None when the row is not shown)."""
        if name not in self._cells:
            return None
        return self.get_cell(name, column).plain

    def show(self, rows: dict[str, dict[str, str]], pattern: re.Pattern[str] | None) -> None:
        """Make the table show ``rows`` (by model name) that match ``pattern``: rows are added, removed and
        changed cell by cell; the cursor stays on the model it was on."""
        selected = self.selected
        wanted = {name: cells for name, cells in rows.items() if pattern is None or pattern.search(name)}
        for name in [n for n in self._cells if n not in wanted]:
            self.remove_row(name)
            del self._cells[name]
        added = False
        for name, cells in wanted.items():
            before = self._cells.get(name)
            if before is None:
                self.add_row(*(Text(cells[key]) for key, _ in fmt.COLUMNS), key=name)
                added = True
            else:
                for key, _ in fmt.COLUMNS:
                    if before[key] != cells[key]:
                        self.update_cell(name, key, Text(cells[key]))  # Text: "[alias]" is not markup
            self._cells[name] = dict(cells)
        if added:
            self.sort("name", key=lambda cell: cell.plain)
        if selected in self._cells:
            index = self.get_row_index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False)
