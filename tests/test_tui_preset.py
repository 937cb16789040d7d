"""The TUI's preset editor (athanor/tui/screens/preset.py) against a real daemon serving the tiny GGUF and MLX
models: it rejects what ``athanor preset set`` rejects, with the CLI's message and without writing, and a valid
edit saved there restarts only that model.

Waits are bounded polls of what the screen or the daemon shows (``until``), never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import psutil
from fixtures.serving import apply_gateway, chat, wait_until
from textual.app import App
from textual.widgets import DataTable, Input

from athanor.tui.screens.dialogs import HelpScreen
from athanor.tui.screens.preset import PresetScreen

SIZE = (120, 40)


class PresetApp(App[None]):
    """Just the editor, for one model (it reads and writes the store under ATHANOR_HOME, as the CLI does)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model

    def on_mount(self) -> None:
        self.push_screen(PresetScreen(self.model))


async def until(pilot, predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Let the app run until ``predicate`` holds, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            notices = [n.message for n in pilot.app._notifications]
            raise AssertionError(f"timed out waiting for {what} (notices: {notices})")
        await pilot.pause(0.05)  # a polling interval with a deadline: the app keeps running meanwhile


def test_the_preset_editor_rejects_an_unknown_key_and_saves_a_valid_one_restarting_only_that_model(gateway, tmp_path):
    apply_gateway(gateway, tmp_path, "  residency: {policy: memory, budget: 90%}\n")  # room for both at once
    for name in ("tiny-gguf", "tiny-mlx"):  # both loaded, by a request each
        assert chat(gateway.client, name).choices
    gguf_pid, mlx_pid = gateway.runtime_pid("tiny-gguf"), gateway.runtime_pid("tiny-mlx")
    assert gguf_pid and mlx_pid
    store_file = gateway.home / "models.json"

    def stored_preset() -> dict:
        return json.loads(store_file.read_text())["models"]["tiny-gguf"]["spec"].get("preset", {})

    cli = gateway.athanor("preset", "set", "tiny-gguf", "bogusKey=1")  # what the CLI says to the same edit
    assert cli.returncode != 0 and "unknown preset key 'bogusKey'" in cli.stderr

    async def drive() -> None:
        app = PresetApp("tiny-gguf")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, PresetScreen) and app.screen.view is not None,
                        "the editor to read the model")
            screen = app.screen
            assert screen.view.runtime == "llama-server" and screen.view.recipe == "balanced"
            assert screen.row("ctxSize") == ("256", "model")
            assert screen.row("batchSize") == ("2048", "recipe:balanced")
            assert screen.row("gpuLayers") == ("999", "default")
            before = store_file.read_bytes()

            field = screen.query_one("#value", Input)
            field.focus()
            await pilot.press(*"bogusKey=1", "enter")
            await until(pilot, lambda: screen.problem != "", "the rejection")
            assert cli.stderr.strip() == f"athanor: {screen.problem}"  # the CLI's message, word for word
            assert screen.problem in str(screen.query_one("#problem").render())
            assert store_file.read_bytes() == before  # nothing written

            table = screen.query_one(DataTable)
            table.focus()
            for _ in range([row.value for row in table.rows].index("ctxSize")):
                await pilot.press("down")
            assert screen.selected == "ctxSize"
            await pilot.press("enter")  # the key's value in the input, to edit
            assert field.has_focus and field.value == "ctxSize=256"
            await pilot.press("backspace", "backspace", "backspace", *"512", "enter")
            await until(pilot, lambda: screen.row("ctxSize") == ("512", "model"), "the saved value in the table")
            assert screen.problem == "" and screen.saved.startswith("model/tiny-gguf preset: ")
            assert stored_preset() == {"ctxSize": 512, "maxTokens": 8}

            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, PresetScreen), "esc back")

    asyncio.run(drive())

    def restarted() -> bool:
        live = gateway.live("tiny-gguf")
        return live["pid"] not in (None, gguf_pid) and live["phase"] == "Ready"

    wait_until(restarted, 180, "the daemon to restart tiny-gguf from the saved preset")
    assert "--ctx-size 512" in " ".join(psutil.Process(gateway.runtime_pid("tiny-gguf")).cmdline())
    assert gateway.phase("tiny-mlx") == "Ready" and gateway.runtime_pid("tiny-mlx") == mlx_pid  # untouched
    assert chat(gateway.client, "tiny-gguf").choices


def test_the_recipe_list_and_x_change_the_model_through_the_store(models, home):
    """No daemon needed: R picks another recipe, x removes the model's own value of a key (its recipe's applies)."""
    store_file = home / "models.json"

    def spec() -> dict:
        return json.loads(store_file.read_text())["models"]["tiny-mlx"]["spec"]

    async def drive() -> None:
        app = PresetApp("tiny-mlx")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, PresetScreen) and app.screen.view is not None,
                        "the editor to read the model")
            screen = app.screen
            assert screen.row("maxTokens") == ("8", "model")
            assert screen.row("prefillStepSize") == ("2048", "recipe:balanced")
            assert screen.row("ctxSize") is None  # a llama-server key: not offered for mlx-lm

            app.push_screen(HelpScreen(screen))  # what ? shows in the TUI
            await until(pilot, lambda: isinstance(app.screen, HelpScreen) and app.screen.query(DataTable)
                        and app.screen.query_one(DataTable).row_count > 0, "the keys")
            keys = app.screen.query_one(DataTable)
            shown = {keys.get_row_at(i)[0]: keys.get_row_at(i)[1] for i in range(keys.row_count)}
            assert {"esc": "back", "Enter": "edit/save", "x": "unset key", "R": "recipe"}.items() <= shown.items()
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is screen, "the keys to close")

            await pilot.press("R")
            select = screen.query_one("#recipe")
            await until(pilot, lambda: select.expanded, "the recipe list to open")
            names = screen.recipe_names
            steps = names.index("fast") - names.index("balanced")
            await pilot.press(*(["down"] * steps), "enter")
            await until(pilot, lambda: screen.row("prefillStepSize") == ("1024", "recipe:fast"), "the fast recipe")
            assert spec()["recipe"] == "fast" and screen.view.recipe == "fast"

            table = screen.query_one(DataTable)
            table.focus()
            for _ in range([row.value for row in table.rows].index("maxTokens")):
                await pilot.press("down")
            await pilot.press("x")
            await until(pilot, lambda: screen.row("maxTokens") == ("2048", "recipe:fast"), "the recipe's maxTokens")
            assert "preset" not in spec()
            assert screen.saved == "model/tiny-mlx preset: <empty>"

            await pilot.press("x")  # not set on the model any more: the CLI's refusal
            await until(pilot, lambda: screen.problem == "not set on tiny-mlx: maxTokens", "the refusal")

    asyncio.run(drive())
