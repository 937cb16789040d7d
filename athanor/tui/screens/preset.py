"""The preset editor (``e``): one model's runtime, recipe and effective preset, each key with its value and where
it comes from (``athanor preset show``), and edits that go through the library calls ``athanor preset set`` and
``unset`` make, so the TUI rejects exactly what the CLI rejects, with the CLI's message.

The store is the only thing written: the running daemon sees models.json change at once and restarts only this
model, and only if what its runtime runs changed (``controller/spec_changes.py``). Store reads and writes are
locked file transactions, so each runs in a thread; a slow disk delays the table, never the keyboard.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Select, Static

COLUMNS = ("key", "value", "from")


@dataclass(frozen=True)
class PresetView:
    """What the editor shows of one model, read from the store as ``athanor preset show`` reads it."""

    name: str  # the model's own name (the screen may have been opened with an alias)
    runtime: str
    recipe: str
    recipes: list[tuple[str, str]]  # (name, description) of every recipe, built-in and the user's
    rows: list[tuple[str, str, str]]  # (key, value, from): the effective keys, then the runtime's unset ones


def read_view(model: str) -> PresetView:
    """The model's preset as it runs (blocking: reads models.json)."""
    from athanor import catalog
    from athanor.runtimes import resolve
    from athanor.runtimes.presets import DEFAULT_RECIPE, keys_for
    from athanor.store import open_store

    doc = open_store().models.load()
    name = catalog.resolve_name(doc, model)
    obj = doc["models"][name]
    effective = resolve.effective_for(doc, obj)
    runtime = obj["spec"]["runtime"]
    rows = [(key, _shown(value.value), value.source) for key, value in effective.items()]
    rows += [(key, "", "-") for key in keys_for(runtime) if key not in effective]
    recipes = [(r.name, r.description) for r in sorted(resolve.recipes(doc).values(), key=lambda r: r.name)]
    return PresetView(name, runtime, obj["spec"].get("recipe", DEFAULT_RECIPE), recipes, rows)


def set_keys(model: str, assignments: list[str]) -> str:
    """``athanor preset set MODEL KEY=VALUE...``: the same call, and the line it prints."""
    from athanor import actions
    from athanor.store import open_store

    store = open_store()
    preset = actions.set_preset(store, model, assignments)
    return _synced(store, f"model/{model} preset: " + ", ".join(f"{k}={v}" for k, v in preset.items()))


def unset_keys(model: str, keys: list[str]) -> str:
    """``athanor preset unset MODEL KEY...``: the same call, and the line it prints."""
    from athanor import actions
    from athanor.store import open_store

    store = open_store()
    preset = actions.unset_preset(store, model, keys)
    return _synced(store, f"model/{model} preset: "
                   + (", ".join(f"{k}={v}" for k, v in preset.items()) or "<empty>"))


def set_recipe(model: str, recipe: str) -> str:
    """Point the model at another recipe through ``actions.set_recipe``, then keep pi in step."""
    from athanor import actions
    from athanor.store import open_store

    store = open_store()
    name = actions.set_recipe(store, model, recipe)
    return _synced(store, f"model/{name} recipe: {recipe}")


def _synced(store: Any, line: str) -> str:
    """Keep pi in step, as the CLI does after a preset change; a failure there is part of the line, not an error
    (the store is saved by then)."""
    from athanor.errors import AthanorError
    from athanor.integrations import pi

    try:
        messages = pi.sync_if_enabled(store, store.models.load())
    except (AthanorError, OSError) as exc:
        messages = [f"the store is saved, but pi's models.json is not: {exc}; 'athanor sync pi' retries"]
    return "\n".join([line, *messages])


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class PresetScreen(Screen[None]):
    VIEW = "preset"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("enter", "edit", "edit/save", key_display="Enter", priority=True),
        Binding("x,delete", "unset", "unset key", key_display="x"),
        Binding("R", "recipe", "recipe"),
        Binding("ctrl+r", "reload", "reload"),
    ]
    DEFAULT_CSS = """
    PresetScreen #title { background: $boost; padding: 0 1; height: 1; }
    PresetScreen #recipe { width: 60; }
    PresetScreen DataTable { height: 1fr; }
    PresetScreen #problem { height: auto; max-height: 4; color: $error; text-style: bold; padding: 0 1; }
    """

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.view: PresetView | None = None
        self.problem = ""  # the last rejection, as the CLI prints it ("" after a save)
        self.saved = ""  # the last save's line, as the CLI prints it
        self.recipe_names: list[str] = []  # the recipe list's options, in order

    def compose(self) -> ComposeResult:
        yield Static(f"preset: {self.model}   loading...", id="title")
        yield Select([], prompt="recipe", allow_blank=True, id="recipe")
        yield DataTable(cursor_type="row", zebra_stripes=True, id="keys")
        yield Static("", id="problem")
        yield Input(placeholder="KEY=VALUE, Enter saves (as 'athanor preset set')", id="value", select_on_focus=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for column in COLUMNS:
            table.add_column(column.upper(), key=column)
        table.focus()
        self.load()

    # ------------------------------------------------------------------ reading

    @work(exclusive=True, group="preset-read")
    async def load(self) -> None:
        try:
            view = await asyncio.to_thread(read_view, self.model)
        except Exception as exc:  # noqa: BLE001 - an unknown model or unreadable store is shown, not raised
            self.query_one("#title", Static).update(f"preset: {self.model}   cannot read it: {exc}")
            return
        self.view = view
        self.query_one("#title", Static).update(
            f"preset: {view.name}   runtime {view.runtime}   recipe {view.recipe}")
        select = self.query_one(Select)
        if self.recipe_names != [name for name, _ in view.recipes]:
            self.recipe_names = [name for name, _ in view.recipes]
            with select.prevent(Select.Changed):
                select.set_options([(f"{name}  {description}".rstrip(), name) for name, description in view.recipes])
        if select.value != view.recipe:
            with select.prevent(Select.Changed):
                select.value = view.recipe if any(n == view.recipe for n, _ in view.recipes) else Select.BLANK
        self._fill(view.rows)

    def _fill(self, rows: list[tuple[str, str, str]]) -> None:
        """Update the table in place when its keys are the same (no flicker, the cursor stays); rebuild it only when
        a key moved between the effective and the unset ones, keeping the cursor on its key."""
        table = self.query_one(DataTable)
        order = [key for key, _, _ in rows]
        if [row_key.value for row_key in table.rows] == order:
            for key, value, origin in rows:
                for column, cell in zip(COLUMNS[1:], (value, origin), strict=True):
                    if table.get_cell(key, column) != cell:
                        table.update_cell(key, column, cell)
            return
        selected = self.selected
        table.clear()
        for key, value, origin in rows:
            table.add_row(key, value, origin, key=key)
        if selected in order:
            table.move_cursor(row=order.index(selected))

    @property
    def selected(self) -> str | None:
        """The key under the table's cursor."""
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def row(self, key: str) -> tuple[str, str] | None:
        """(value, from) of ``key`` as the table shows it."""
        table = self.query_one(DataTable)
        try:
            return table.get_cell(key, "value"), table.get_cell(key, "from")
        except Exception:  # noqa: BLE001 - not a row
            return None

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "edit":  # Enter belongs to the recipe list while it is open
            return not self.query_one(Select).has_focus_within
        return True

    def action_edit(self) -> None:
        """Enter: on the table, put the key's current value in the input; in the input, save it."""
        field = self.query_one("#value", Input)
        if field.has_focus:
            self._save(field.value)
            return
        key = self.selected
        if key is None:
            field.focus()
            return
        value, _ = self.row(key) or ("", "")
        field.value = f"{key}={value}"
        field.cursor_position = len(field.value)
        field.focus()

    def action_unset(self) -> None:
        key = self.selected
        if key is not None and self.view is not None:
            self.write(unset_keys, self.view.name, [key])

    def action_recipe(self) -> None:
        select = self.query_one(Select)
        select.focus()
        select.expanded = True

    def action_reload(self) -> None:
        self.load()

    @on(Select.Changed, "#recipe")
    def _recipe_picked(self, event: Select.Changed) -> None:
        if self.view is None or event.value is Select.BLANK or event.value == self.view.recipe:
            return
        self.write(set_recipe, self.view.name, str(event.value))
        self.query_one(DataTable).focus()

    def _save(self, text: str) -> None:
        text = text.strip()
        if not text or self.view is None:
            return
        import shlex

        try:
            assignments = shlex.split(text)  # as a shell would pass them to 'athanor preset set'
        except ValueError:
            assignments = [text]
        self.write(set_keys, self.view.name, assignments)

    # ------------------------------------------------------------------ writing

    @work(group="preset-write")
    async def write(self, call: Any, name: str, args: Any) -> None:
        """Run one store transaction in a thread; a rejection is shown under the table with the CLI's message,
        and nothing is written."""
        from athanor.errors import AthanorError

        problem = self.query_one("#problem", Static)
        try:
            line = await asyncio.to_thread(call, name, args)
        except AthanorError as exc:
            self.problem = str(exc)
            problem.update(self.problem)
            self.query_one("#value", Input).focus()
            return
        except Exception as exc:  # noqa: BLE001 - the store failing is shown, the editor stays usable
            self.problem = f"internal error: {type(exc).__name__}: {exc}"
            problem.update(self.problem)
            return
        self.problem, self.saved = "", line
        problem.update("")
        self.query_one("#value", Input).value = ""
        self.query_one(DataTable).focus()
        self.notify(line, title="saved")
        self.load()
