"""The TUI's search (``S``) and downloads (``D``) views against the fake hub (tests/fixtures/fake_hub.py) and a real
daemon: the real huggingface_hub client in the TUI's process (HF_ENDPOINT from the ``fake_hub`` fixture, the
test's private HF cache), the pull the CLI makes, registration by the real discovery, and the daemon's admin API
and the main view's table showing the model.

Waits are bounded polls of what the app shows (``until``), never sleeps; the hub holds the download at a point the
test chooses, so "the download goes on while the user is elsewhere" is seen, not timed.
"""

from __future__ import annotations

import os
from pathlib import Path

from fixtures.tui import SIZE, in_loop, until
from fixtures.fake_hub import HeldFile, HubRepo, tiny_gguf

from athanor.tui.app import AthanorApp
from athanor.tui.downloads import DOWNLOADING, FAILED, QUEUED, REGISTERED, Downloads
from athanor.tui.screens.dialogs import ConfirmScreen, HelpScreen
from athanor.tui.screens.downloads import DownloadsScreen
from athanor.tui.screens.search import Results, SearchScreen
from athanor.tui.widgets.models import ModelTable

MiB = 2**20
HELD = "athanor-test/Tui-Held-GGUF"
HELD_FILE = "Tui-Held-Q4_K_M.gguf"
BAND_ORDER = {"comfortable": 0, "tight": 1, "risky": 2, "-": 3}


def table(app: AthanorApp) -> ModelTable:
    """The main view's model table."""
    return app.main.query_one(ModelTable)


async def opened(pilot, kind: type) -> None:
    """Until the app's screen is a ``kind`` whose widgets are mounted."""
    await until(pilot, lambda: isinstance(pilot.app.screen, kind) and bool(pilot.app.screen.query("Footer")),
                f"the {kind.__name__}")


async def help_lists(pilot, expected: dict[str, str]) -> None:
    """Press ``?`` and wait until the keys it lists include ``expected`` (key -> what it does); esc closes it."""
    def listed() -> dict[str, str]:
        screen = pilot.app.screen
        if not isinstance(screen, HelpScreen) or not screen.query("DataTable"):
            return {}
        keys = screen.query_one("DataTable")
        return {str(keys.get_cell_at((i, 0))): str(keys.get_cell_at((i, 1))) for i in range(keys.row_count)}

    before = pilot.app.screen
    await pilot.press("question_mark")
    await until(pilot, lambda: expected.items() <= listed().items(), f"? to list {expected}")
    await pilot.press("escape")
    await until(pilot, lambda: pilot.app.screen is before, "esc to close the keys")


def results(screen: SearchScreen) -> list[tuple[str, str]]:
    """(repo, fit) of the rows the search view shows, top to bottom."""
    grid = screen.query_one(Results)
    return [(str(grid.get_cell_at((i, 0))), str(grid.get_cell_at((i, 4)))) for i in range(grid.row_count)]


@in_loop
async def test_search_sorted_by_fit_then_enter_pulls_and_the_download_goes_on_in_the_downloads_view(fake_hub,
                                                                                                   gateway):
    held = HeldFile(tiny_gguf(15), size=24 * MiB, hold_after=15 * MiB)  # a real GGUF followed by zeros: 10 MiB show before the hold
    fake_hub.add(HubRepo(HELD, {HELD_FILE: held}, library_name="gguf", downloads=10))
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: table(app).cell("tiny-gguf", "phase") == "Standby", "the table")
        app.push_screen(SearchScreen())  # the lead wires S to it; the view needs only the app
        await opened(pilot, SearchScreen)
        search = app.screen
        await pilot.press(*"athanor-test/", "enter")  # "/" types into the query while it has focus
        await until(pilot, lambda: not search.searching and len(results(search)) >= 5, "the search's rows")
        shown = results(search)
        repos = [repo for repo, _ in shown]
        assert {"athanor-test/Tiny-Llama-GGUF", "athanor-test/Mid-8B-GGUF", HELD} <= set(repos)
        assert all(repo.startswith("athanor-test/") for repo in repos)
        bands = [BAND_ORDER[fit] for _, fit in shown]
        assert bands == sorted(bands) and len(set(bands)) >= 2, shown  # best fit first
        assert shown[-1] == ("athanor-test/Huge-GGUF", "risky")  # 200 GB: risky on any machine, fewest downloads
        assert app.focused is search.query_one(Results)
        footer = {key: b.binding.description for key, b in search.active_bindings.items() if b.binding.show}
        assert (footer["enter"], footer["slash"], footer["escape"]) == ("pull", "query", "back"), footer
        await help_lists(pilot, {"Enter": "pull", "/": "query", "esc": "back"})
        await pilot.press("slash")  # / back to the query
        assert app.focused is search.query_one("#query")

        search.query_one("#query").value = ""
        await pilot.press(*"Tui-Held", "enter")
        await until(pilot, lambda: not search.searching and [r for r, _ in results(search)] == [HELD], "the held repo")
        await pilot.press("enter")  # on the row: asks first
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the pull question")
        assert HELD in app.screen.question
        await pilot.press("n")
        await until(pilot, lambda: app.screen is search, "no to close the question")
        assert getattr(app, "downloads", None) is None or not app.downloads.items  # nothing pulled
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the pull question again")
        await pilot.press("y")
        await until(pilot, lambda: isinstance(getattr(app, "downloads", None), Downloads) and app.downloads.items,
                    "the pull to be queued")
        downloads: Downloads = app.downloads
        pull_id = downloads.items[0].id

        await pilot.press("escape")  # leave the search view while the hub holds the download
        await until(pilot, lambda: app.screen is app.main, "esc back to the main view")
        await until(pilot, lambda: held.started.is_set(), "the download to reach the hold", timeout=60)
        app.push_screen(DownloadsScreen())
        await opened(pilot, DownloadsScreen)
        view = app.screen
        await until(pilot, lambda: pull_id in view.shown and view.shown[pull_id].done >= 10 * MiB,
                    "the progress so far, in the view")
        assert view.shown[pull_id].state == DOWNLOADING
        grid = view.query_one("DataTable")
        assert str(grid.get_cell(str(pull_id), "bytes")) == "10.0MiB/24.0MiB 41%"
        assert str(grid.get_cell(str(pull_id), "detail")) == HELD_FILE

        held.release.set()
        await until(pilot, lambda: view.shown[pull_id].state in (REGISTERED, FAILED), "the pull to end")
        done = view.shown[pull_id]
        assert done.state == REGISTERED, done.error
        assert done.models == ("tui-held-q4-k-m",)
        assert str(grid.get_cell(str(pull_id), "bytes")) == "24.0MiB/24.0MiB 100%"
        assert str(grid.get_cell(str(pull_id), "detail")) == "model/tui-held-q4-k-m"
        assert grid.row_count == 1  # updated in place, not added again
        await until(pilot, lambda: any(f"{HELD} pulled: model/tui-held-q4-k-m" in n.message
                                       for n in app._notifications), "the notice that the pull is done")

        listing = await app.session.get("/models")  # the daemon serves what the pull registered
        assert "tui-held-q4-k-m" in [m["metadata"]["name"] for m in listing["items"]]
        await pilot.press("escape")
        await until(pilot, lambda: table(app).cell("tui-held-q4-k-m", "phase") == "Standby",
                    "the pulled model in the main table")
        await pilot.press("q")


@in_loop
async def test_a_pull_the_hub_refuses_fails_with_one_line_and_a_queued_pull_can_be_cancelled(fake_hub, home):
    """No daemon: the views and the pulls need only the store and the hub; a gated repo fails as the CLI says."""
    held = HeldFile(tiny_gguf(15), size=24 * MiB, hold_after=15 * MiB)
    fake_hub.add(HubRepo(HELD, {HELD_FILE: held}, library_name="gguf"))
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(DownloadsScreen())
        await opened(pilot, DownloadsScreen)
        view = app.screen
        assert "no pulls" in str(view.query_one("#detail").render())
        downloads: Downloads = app.downloads  # the view made the app's downloads
        first = downloads.pull(HELD)
        assert downloads.pull(HELD).id == first.id  # a repo under way is not pulled twice
        gated = downloads.pull("athanor-gated/Gated-Llama-GGUF")  # waits for the first
        await until(pilot, lambda: held.started.is_set(), "the first download to reach the hold", timeout=60)
        await until(pilot, lambda: gated.id in view.shown and view.shown[gated.id].state == QUEUED, "the queued row")
        view.query_one("DataTable").move_cursor(row=0)
        await pilot.press("x")  # cancel asks first
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the cancel question")
        await pilot.press("y")
        await until(pilot, lambda: view.shown[first.id].cancelling, "the pull to be cancelling")
        assert str(view.query_one("DataTable").get_cell(str(first.id), "detail")).startswith("cancelling")
        held.release.set()  # the next chunk meets the cancel
        await until(pilot, lambda: view.shown[first.id].state == FAILED, "the cancelled pull")
        assert view.shown[first.id].error == "cancelled: nothing was registered"
        await until(pilot, lambda: view.shown[gated.id].state == FAILED, "the gated pull to fail")
        error = view.shown[gated.id].error
        assert "gated" in error.lower() and "\n" not in error, error
        assert str(view.query_one("DataTable").get_cell(str(gated.id), "detail")) == error
        cache = Path(os.environ["HF_HUB_CACHE"])
        assert not list(cache.rglob("*.incomplete"))  # the cancelled file was removed
        assert not list(cache.rglob(HELD_FILE))
        await help_lists(pilot, {"esc": "back", "x": "cancel pull"})
        await pilot.press("q")
