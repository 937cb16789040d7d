"""The TUI's telemetry view (athanor/tui/screens/telemetry.py) against a real daemon serving the tiny GGUF and MLX
models: requests sent with the openai SDK show up in its compare table and sparklines, `r` fetches again, `c`
clears (after asking), and snapshots pin its layout at 80x24 and 160x48.

Waits are bounded polls of what the screen shows, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.tui import SIZE, in_loop, until
from fixtures.serving import chat

from athanor.telemetry import db
from athanor.tui.client import AdminSession, Target, locate
from athanor.tui.screens.dialogs import ConfirmScreen
from athanor.tui.screens.telemetry import TelemetryScreen
from textual.app import App
from textual.widgets import DataTable


class TelemetryApp(App[None]):
    """Just the view under test, with a session on the running daemon (as AthanorApp's main view makes one)."""

    ENABLE_COMMAND_PALETTE = False

    def __init__(self, view: TelemetryScreen) -> None:
        super().__init__()
        self.view = view
        self.session: AdminSession | None = None

    async def on_mount(self) -> None:
        target = await asyncio.to_thread(locate, None)
        assert isinstance(target, Target), target
        self.session = AdminSession(target)
        await self.push_screen(self.view)

    async def on_unmount(self) -> None:
        if self.session is not None:
            await self.session.close()


def cell(view: TelemetryScreen, model: str, column: str) -> str | None:
    table = view.query_one("#figures", DataTable)
    try:
        return str(table.get_cell(model, column))
    except Exception:  # noqa: BLE001 - the row is not there (yet)
        return None


def decode_points(gateway, model: str) -> list[float]:
    """The decode tokens/s the daemon recorded for ``model``, oldest first (llama-server always times its work;
    mlx_lm.server has a figure only when it streamed two tokens or more)."""
    with urllib.request.urlopen(f"{gateway.url}/athanor/v1/telemetry?model={model}", timeout=30) as resp:
        items = json.load(resp)["items"]
    return [r["decodeTokensPerSecond"] for r in reversed(items) if r["decodeTokensPerSecond"] is not None]


def streamed(gateway, model: str) -> None:
    """One streamed chat, read to the end (a streamed answer has a TTFT, so every runtime gets a decode rate)."""
    for _ in chat(gateway.client, model, stream=True, max_tokens=8):
        pass


def test_the_view_compares_the_models_that_answered_and_follows_new_requests(gateway):
    sent = {"tiny-gguf": 2, "tiny-mlx": 1}
    for model, count in sent.items():
        for _ in range(count):
            streamed(gateway, model)

    async def drive() -> None:
        view = TelemetryScreen()  # every model with records
        app = TelemetryApp(view)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: view.loaded > 0 and view.shown, "the first figures")
            assert view.shown == ["tiny-gguf", "tiny-mlx"]
            assert not view.has_class("empty")
            for model, count in sent.items():
                assert cell(view, model, "model") == model
                assert cell(view, model, "requests") == str(count)
                assert cell(view, model, "errors") == "0"
                assert cell(view, model, "ttft50").endswith("ms")
                points = await asyncio.to_thread(decode_points, gateway, model)
                spark = view.sparkline(model)
                assert spark is not None and list(spark.data) == points  # one point per timed request, oldest first
                assert cell(view, model, "decode") == (f"{statistics.median(points):.1f}" if points else "-")
            assert len(view.sparkline("tiny-gguf").data) == sent["tiny-gguf"]
            table = view.query_one("#figures", DataTable)
            rows = table.row_count

            await asyncio.to_thread(streamed, gateway, "tiny-mlx")
            before = view.loaded
            await pilot.press("r")
            await until(pilot, lambda: view.loaded > before and cell(view, "tiny-mlx", "requests") == "2",
                        "r to show the new request")
            assert list(view.sparkline("tiny-mlx").data) == await asyncio.to_thread(decode_points, gateway, "tiny-mlx")
            assert cell(view, "tiny-gguf", "requests") == "2"
            assert table.row_count == rows  # updated in place, not rebuilt

            await pilot.press("N")  # a smaller window: each model over its last 20
            await until(pilot, lambda: view.window == 20 and "last 20 requests" in str(view.query_one("#title")
                                                                                       .render()), "the window")
            await pilot.press("n", "n", "n")
            assert view.window == 500

            await pilot.press("c")  # clearing asks first; "n" keeps every record
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the clear question")
            await pilot.press("n")
            await until(pilot, lambda: app.screen is view, "the question to close")
            before = view.loaded
            await pilot.press("r")
            await until(pilot, lambda: view.loaded > before, "a refresh")
            assert cell(view, "tiny-gguf", "requests") == "2"

            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the clear question")
            await pilot.press("y")
            await until(pilot, lambda: view.has_class("empty"), "the empty state after clearing")
            assert view.shown == []
            assert "no requests recorded yet" in str(view.query_one("#empty").render())
        marked = TelemetryScreen(["tiny-alias", "tiny-mlx"])  # the user's marks, by any name the gateway takes
        app = TelemetryApp(marked)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: marked.loaded > 0, "the marked models' figures")
            assert marked.has_class("empty")  # cleared above: nothing recorded yet
            await asyncio.to_thread(streamed, gateway, "tiny-alias")
            await pilot.press("r")
            await until(pilot, lambda: cell(marked, "tiny-alias", "requests") == "1", "the aliased model's request")
            assert cell(marked, "tiny-alias", "model") == "tiny-gguf"  # the daemon resolves the alias
            assert cell(marked, "tiny-mlx", "requests") == "0" and cell(marked, "tiny-mlx", "decode") == "-"
            assert not marked.has_class("empty")

    asyncio.run(drive())
    assert gateway.phase("tiny-gguf") == "Ready"  # the view only reads


def record(model: str, runtime: str, n: int) -> db.Row:
    """A fixed record, so the snapshot's figures are the same on every run."""
    return db.Row(time.time() - 60 + n, model, runtime, "/v1/chat/completions", 200, 20 + n, 8, 0, 0.05 + n / 100,
                  0.5 + n / 50, 40.0 + 7 * (n % 5), 300.0 + 10 * n, False)


def write_records(gateway, rows: list[db.Row]) -> None:
    """Records written straight into the daemon's file, in the recorder's own format."""
    conn = db.connect(db.path_in(Path(gateway.home)), create=True)
    assert conn is not None
    try:
        db.write(conn, rows, db.Retention(None, None), time.time())
    finally:
        conn.close()


def _ready(view: TelemetryScreen, count: int) -> Callable:
    async def wait(pilot) -> None:
        await until(pilot, lambda: view.loaded > 0 and len(view.shown) == count, "the figures")
        # What the screenshot is made of, the lines the table draws, shows every name whole (a model column
        # left to widen itself once drew the names cut short on a busy machine, and kept them so).
        await until(pilot, lambda: all(name in drawn(view) for name in view.shown), "every name drawn whole")
        await pilot.pause()
    return wait


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_snapshot_of_the_telemetry_view(gateway, snap_compare, size):
    """Records written straight into the daemon's file (the recorder's own format), read back through the API."""
    write_records(gateway, [record("tiny-gguf", "llama-cpp", n) for n in range(12)]
                  + [record("tiny-mlx", "mlx-lm", n) for n in range(7)])
    view = TelemetryScreen()
    assert snap_compare(TelemetryApp(view), terminal_size=size, run_before=_ready(view, 2))


def drawn(view: TelemetryScreen) -> str:
    """The table's rows as it draws them (what a screenshot is made of)."""
    table = view.query_one("#figures", DataTable)
    return "\n".join(table.render_line(y).text for y in range(1, table.row_count + 1))


def test_a_figure_that_outgrows_its_column_is_drawn_whole(gateway):
    """The columns are as wide as their widest figure, whenever it grows: a prompt count past its header's width
    is drawn in full after a refresh, never cut short."""
    write_records(gateway, [record("tiny-gguf", "llama-cpp", 0)])

    async def drive() -> None:
        view = TelemetryScreen(["tiny-gguf"])
        async with TelemetryApp(view).run_test(size=SIZE) as pilot:
            await until(pilot, lambda: cell(view, "tiny-gguf", "prompt") == "20", "the first figures")
            grown = record("tiny-gguf", "llama-cpp", 0)._replace(prompt_tokens=123_456_789)
            await asyncio.to_thread(write_records, gateway, [grown])
            await pilot.press("r")
            await until(pilot, lambda: "123456809" in drawn(view), "the grown count drawn whole")
            assert "tiny-gguf" in drawn(view)

    asyncio.run(drive())


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_snapshot_of_the_empty_telemetry_view(gateway, snap_compare, size):
    view = TelemetryScreen()

    async def wait(pilot) -> None:
        await until(pilot, lambda: view.loaded > 0 and view.has_class("empty"), "the empty state")
        await pilot.pause()

    assert snap_compare(TelemetryApp(view), terminal_size=size, run_before=wait)
