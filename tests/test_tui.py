"""The TUI (athanor/tui) against a real daemon serving the tiny GGUF model: Textual's Pilot drives the same app
``athanor`` opens, and a tmux smoke test runs the real entry point on a real terminal.

Waits are bounded polls of what the screen shows (``until``), never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest
from textual.widgets import DataTable
from conftest import ATHANOR
from fixtures.tui import SIZE, in_loop, until
from fixtures.serving import _descendants_of_home, apply_gateway, chat, free_port, wait_until, write_gateway

from athanor.store import open_store
from athanor.tui.app import AthanorApp
from athanor.tui.client import AdminUnavailable
from athanor.tui.screens.dialogs import ConfirmScreen
from athanor.tui.screens.logs import LogsScreen
from athanor.tui.widgets.models import ModelTable
from athanor.tui.widgets.panes import Banner, EventFeed, LogTail


def after(lines: list[str], marker: str) -> str:
    """The text of ``lines`` after the last one that holds ``marker`` ("" when none does)."""
    found = [i for i, line in enumerate(lines) if marker in line]
    return "\n".join(lines[found[-1] + 1:]) if found else ""


def table(app: AthanorApp) -> ModelTable:
    return app.main.query_one(ModelTable)


def banner(app: AthanorApp) -> str:
    widget = app.main.query_one(Banner)
    return str(widget.render()) if widget.has_class("shown") else ""


@in_loop
async def test_the_table_shows_a_phase_change_live_when_another_client_starts_a_model(gateway):
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        models = table(app)
        await until(pilot, lambda: models.cell("tiny-gguf", "phase") == "Standby", "the table to list tiny-gguf")
        assert models.cell("tiny-gguf", "markers") == "[alias] [tuned]"
        assert models.cell("tiny-mlx", "runtime") == "mlx-lm"
        assert banner(app) == ""
        await pilot.press("down")  # the cursor on tiny-mlx: it must stay there while tiny-gguf's row changes
        assert models.selected == "tiny-mlx"
        rows = models.row_count

        phases: list[str] = []

        def seen(phase: str) -> bool:
            current = models.cell("tiny-gguf", "phase") or ""
            if not phases or phases[-1] != current:
                phases.append(current)
            return current == phase

        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(chat, gateway.client, "tiny-gguf")  # another client starts it, by a request
            await until(pilot, lambda: seen("Ready"), "the table to show tiny-gguf Ready")
            assert reply.result(timeout=120).choices
        assert phases[0] == "Standby" and phases[-1] == "Ready", phases
        assert all(p in ("Standby", "Ready") or p.startswith("Starting") for p in phases), phases
        assert models.cell("tiny-gguf", "port") == str(gateway.live("tiny-gguf")["port"])
        await until(pilot, lambda: models.cell("tiny-gguf", "rss") != "-", "the runtime's memory")
        assert models.selected == "tiny-mlx" and models.row_count == rows
        feed = app.main.query_one(EventFeed)
        await until(pilot, lambda: any("tiny-gguf Ready" in line for line in feed.lines), "the Ready event in the feed")
        await pilot.press("q")
    assert gateway.phase("tiny-gguf") == "Ready"  # quitting the TUI changes nothing


@in_loop
async def test_enter_starts_and_stops_a_model_and_destructive_keys_ask_first(gateway):
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        models = table(app)
        await until(pilot, lambda: models.cell("tiny-gguf", "phase") == "Standby", "the table to list tiny-gguf")
        assert models.selected == "tiny-gguf"

        await pilot.press("enter")
        await until(pilot, lambda: models.cell("tiny-gguf", "phase") == "Ready", "Enter to start tiny-gguf")
        assert gateway.phase("tiny-gguf") == "Ready"
        first = gateway.runtime_pid("tiny-gguf")

        await pilot.press("r")  # restart asks first; "n" leaves the model alone
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the restart question")
        await pilot.press("n")
        await until(pilot, lambda: app.screen is app.main, "the question to close")
        assert gateway.runtime_pid("tiny-gguf") == first

        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the restart question")
        await pilot.press("y")
        await until(pilot, lambda: gateway.runtime_pid("tiny-gguf") not in (None, first)
                    and models.cell("tiny-gguf", "phase") == "Ready", "the restart")
        tail = app.main.query_one(LogTail)  # the selected model's log, followed into its new runtime
        await until(pilot, lambda: "listening on" in after(tail.lines, "runtime 2 of tiny-gguf starting"),
                    "the log of the new runtime")

        await pilot.press("enter")  # idle: stops without a question
        await until(pilot, lambda: models.cell("tiny-gguf", "phase") == "Standby", "Enter to stop tiny-gguf")
        assert gateway.phase("tiny-gguf") == "Standby" and gateway.runtime_pid("tiny-gguf") is None

        await pilot.press("enter")
        await until(pilot, lambda: models.cell("tiny-gguf", "phase") == "Ready", "Enter to start it again")
        await pilot.press("k")  # kill asks first
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the kill question")
        await pilot.press("y")
        await until(pilot, lambda: models.cell("tiny-gguf", "phase") == "Standby", "k to stop it")
        assert gateway.runtime_pid("tiny-gguf") is None
        await pilot.press("q")


@in_loop
async def test_keys_views_and_filter(gateway):
    """?, /, i, Tab and : against a real daemon: each opens its view and esc comes back."""
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        models = table(app)
        await until(pilot, lambda: models.cell("tiny-mlx", "phase") == "Standby", "the table")
        await pilot.press("slash", "m", "l", "x")
        await until(pilot, lambda: models.row_count == 1 and models.cell("tiny-gguf", "phase") is None, "the filter")
        await pilot.press("escape")
        await until(pilot, lambda: models.row_count == 2, "the filter to clear")
        models.focus()

        assert models.selected == "tiny-mlx"  # the cursor stayed on the row the filter left
        await pilot.press("i")
        await until(pilot, lambda: "runtime: mlx-lm" in getattr(app.screen, "text", ""),
                    "describe to show the model")
        await pilot.press("escape")
        await pilot.press("tab")  # full-screen logs of tiny-mlx, with their toggles
        await until(pilot, lambda: isinstance(app.screen, LogsScreen), "the logs view")
        logs = app.screen
        assert logs.model == "tiny-mlx" and (logs.follow, logs.wrap, logs.stamps) == (True, False, False)
        await pilot.press("w", "t", "f")
        assert (logs.follow, logs.wrap, logs.stamps) == (False, True, True)
        assert "follow off   wrap on   timestamps on" in str(logs.query_one("#title").render())
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.main, "esc back from the logs")
        await pilot.press("question_mark")
        await until(pilot, lambda: type(app.screen).__name__ == "HelpScreen", "the keys")
        await pilot.press("escape")
        await pilot.press("D")  # the downloads of this session: none yet
        await until(pilot, lambda: type(app.screen).__name__ == "DownloadsScreen", "the downloads view")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.main, "esc back from the downloads")
        await pilot.press("S")  # the Hub search (nothing is asked of the Hub until a query is typed)
        await until(pilot, lambda: type(app.screen).__name__ == "SearchScreen", "the search view")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.main, "esc back from the search")
        await pilot.press("space")  # marks tiny-mlx for the telemetry view, which compares the marked models
        assert models.cell("tiny-mlx", "markers").startswith("[marked]") and app.main.marked == {"tiny-mlx"}
        await pilot.press("t")
        await until(pilot, lambda: type(app.screen).__name__ == "TelemetryScreen", "the telemetry view")
        assert app.screen.chosen == ["tiny-mlx"]
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.main, "esc back from telemetry")
        await pilot.press("e")
        await until(pilot, lambda: type(app.screen).__name__ == "PresetScreen", "the preset editor")
        assert app.screen.model == "tiny-mlx"
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.main, "esc back from the preset editor")
        await pilot.press("colon", *"events", "enter")
        await until(pilot, lambda: type(app.screen).__name__ == "EventsScreen", ":events")
        await pilot.press("colon", *"models", "enter")
        await until(pilot, lambda: app.screen is app.main, ":models")
        await pilot.press("colon", "q", "enter")
    assert app.return_code in (0, None)


@in_loop
async def test_reopened_after_a_daemon_restart_it_shows_logs_and_the_last_requests_figures_at_once(gateway):
    """Closing the TUI changes nothing; the telemetry it shows outlives the daemon (kill -9, then a new daemon
    that re-attaches), and a reopened TUI shows the log and the last requests' figures without another request."""
    import signal

    from athanor.tui.screens.telemetry import TelemetryScreen
    from fixtures.serving import start_daemon

    for _ in range(2):
        chat(gateway.client, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: table(app).cell("tiny-gguf", "toks") not in (None, "-"), "the last tok/s")
        await pilot.press("q")
    assert gateway.runtime_pid("tiny-gguf") == pid and gateway.phase("tiny-gguf") == "Ready", "quitting changed it"

    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    gateway.proc = start_daemon(gateway.home, int(gateway.url.rsplit(":", 1)[1]))
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: table(app).cell("tiny-gguf", "toks") not in (None, "-"),
                    "the last tok/s after the restart")
        await until(pilot, lambda: any("llama_server" in line or "listening on" in line
                                       for line in app.main.query_one(LogTail).lines), "the log tail")
        app.push_screen(TelemetryScreen(["tiny-gguf"]))

        def requests_shown() -> str | None:
            try:
                return str(app.screen.query_one(DataTable).get_cell("tiny-gguf", "requests"))
            except Exception:  # noqa: BLE001 - not composed or filled yet
                return None

        await until(pilot, lambda: requests_shown() == "2", "the two requests in the telemetry view")
        await pilot.press("escape", "q")
    assert gateway.runtime_pid("tiny-gguf") == pid, "re-attached, never restarted"


@pytest.fixture
def stops_daemon(home: Path) -> Iterator[None]:
    """Whatever a test starts in this home is stopped afterwards: athanor down, then anything left is killed."""
    try:
        yield
    finally:
        subprocess.run([ATHANOR, "down"], env=dict(os.environ), capture_output=True, timeout=120)
        leftovers = _descendants_of_home(home)
        for leftover in leftovers:
            leftover.kill()
        wait_until(lambda: not _descendants_of_home(home), 10, "killed leftovers to die")
        assert not leftovers, f"left running after down: {leftovers}"


@pytest.fixture
def idle_home(home: Path, models: Path, tmp_path: Path, stops_daemon: None) -> str:
    """A home with the tiny models and a Gateway on a free port, and no daemon yet."""
    port = free_port()
    write_gateway(tmp_path, f"  listen: 127.0.0.1:{port}\n")
    return f"127.0.0.1:{port}"


@pytest.fixture
def empty_home(home: Path, tmp_path: Path, stops_daemon: None) -> str:
    """A home with no model and a Gateway on a free port, and no daemon yet."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    write_gateway(tmp_path, f"  listen: 127.0.0.1:{port}\n")
    return f"127.0.0.1:{port}"


@in_loop
async def test_says_the_daemon_is_not_running_starts_it_on_u_and_attaches_again_after_it_comes_back(idle_home):
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "not running" in banner(app), "the not-running banner")
        assert table(app).row_count == 0

        await pilot.press("u")  # athanor up, in a worker
        await until(pilot, lambda: table(app).cell("tiny-gguf", "phase") == "Standby" and not banner(app),
                    "the TUI to attach to the daemon it started")
        assert idle_home in str(app.main.query_one("#header").render())

        down = await asyncio.to_thread(subprocess.run, [ATHANOR, "down"], env=dict(os.environ),
                                       capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        await until(pilot, lambda: "went away" in banner(app), "the went-away banner")

        up = await asyncio.to_thread(subprocess.run, [ATHANOR, "up"], env=dict(os.environ),
                                     capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        await until(pilot, lambda: not banner(app) and table(app).cell("tiny-gguf", "phase") == "Standby",
                    "the TUI to attach again")
        await pilot.press("q")


@in_loop
async def test_with_no_model_it_suggests_starters_for_this_machine_with_their_pull_commands(empty_home, fake_hub):
    from athanor.hub.starters import suggestions
    from athanor.tui.screens.dialogs import StarterPicker
    from athanor.tui.widgets.panes import EmptyState

    # HF_ENDPOINT is the local fake hub (fake_hub), which has no starter repo: the pull is refused, nothing leaves

    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("u")
        empty = app.main.query_one(EmptyState)
        await until(pilot, lambda: empty.display and "athanor pull" in str(empty.render()), "the starters")
        try:
            total = (await app.session.get("/daemon"))["memory"]["totalBytes"]
        except AdminUnavailable:  # a daemon without /daemon: the TUI sizes the tier from this machine
            total = psutil.virtual_memory().total
        tier, picks = suggestions(total)
        shown = str(empty.render())
        assert f"({tier} tier" in shown and all(pick.pull in shown for pick in picks)
        assert not table(app).display
        await pilot.press("enter")  # Enter picks a starter to pull
        await until(pilot, lambda: isinstance(app.screen, StarterPicker), "the starter picker")
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "DownloadsScreen", "the downloads view")
        [download] = app.downloads.items
        assert (download.repo, download.only) == (picks[0].repo, (picks[0].file,) if picks[0].file else ())
        await until(pilot, lambda: app.downloads.items[0].error is not None, "the pull to be refused")
        assert picks[0].repo in app.downloads.items[0].error and "\n" not in app.downloads.items[0].error
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.main, "esc back from the downloads")
        await pilot.press("p", *"org/repo model.Q4_K_M.gguf", "enter")  # p: a repo (and file) as athanor pull
        await until(pilot, lambda: len(app.downloads.items) == 2, "the second pull to be queued")
        assert (app.downloads.items[1].repo, app.downloads.items[1].only) == ("org/repo", ("model.Q4_K_M.gguf",))
        await pilot.press("q")


def test_athanor_alone_without_a_terminal_prints_help_and_tui_says_it_needs_one(cli):
    alone = cli()
    assert alone.returncode == 2 and "Usage: athanor" in alone.stderr and "tui " in alone.stderr  # click's help
    tui = cli("tui")
    assert tui.returncode == 1 and "needs a terminal" in tui.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (scripts/setup.sh --test installs it)")
def test_athanor_in_tmux_shows_the_models_and_quits_leaving_them_running(gateway, tmp_path):
    socket = f"athanor-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}
    env.pop("NO_COLOR", None)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True,
                              env=env).stdout

    def running() -> bool:
        return subprocess.run([*tmux, "has-session", "-t", "tui"], capture_output=True, env=env).returncode == 0

    assert gateway.runtime_pid("tiny-gguf") is None
    command = f"ATHANOR_HOME={gateway.home} {ATHANOR}"
    subprocess.run([*tmux, "new-session", "-d", "-s", "tui", "-x", "160", "-y", "48", command], env=env, check=True)
    try:
        wait_until(lambda: "tiny-gguf" in screen() and "Standby" in screen(), 60, "the model table in tmux")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "Enter"], env=env, check=True)
        wait_until(lambda: "Ready" in screen(), 120, "Enter to start the model, on the screen")
        pid = gateway.runtime_pid("tiny-gguf")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "q"], env=env, check=True)
        wait_until(lambda: not running(), 30, "q to quit the TUI")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, env=env)
    assert gateway.runtime_pid("tiny-gguf") == pid and gateway.phase("tiny-gguf") == "Ready"
    assert chat(gateway.client, "tiny-gguf").choices  # the model still answers


def test_cells_of_an_older_daemon_s_answers_are_dashes_never_errors():
    """What a daemon without fit, process figures, telemetry or /daemon answers: "-" in those places."""
    from athanor.tui import format as fmt

    bare = {"metadata": {"name": "m"}, "spec": {"runtime": "llama-server"}, "status": {"phase": "Standby"}}
    assert fmt.row(bare) == {"name": "m", "runtime": "llama-server", "port": "-", "phase": "Standby", "cpu": "-",
                             "rss": "-", "toks": "-", "fit": "-", "markers": "-"}
    assert fmt.row({}) == {key: "-" for key, _ in fmt.COLUMNS}
    starting = {"metadata": {"name": "m"}, "spec": {"residency": "pinned", "publish": False},
                "status": {"phase": "Starting", "conditions": [
                    {"type": "Ready", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    cells = fmt.row(starting, now=datetime(2026, 1, 1, 0, 0, 42, tzinfo=timezone.utc).timestamp())
    assert cells["phase"] == "Starting 42s" and cells["markers"] == "[pinned] [hidden]"
    header = fmt.header(None, "127.0.0.1:8080", 123)
    assert "pid 123" in header and "ingress http://127.0.0.1:8080" in header and "mem -/-" in header


# ---------------------------------------------------------------------------------- store writes: P, d, s, f


def notices(app: AthanorApp) -> list[str]:
    return [n.message for n in app._notifications]


def listed(gateway) -> set[str]:
    """What GET /v1/models lists (blocking: run it in a thread)."""
    return {m.id for m in gateway.client.models.list().data}


@in_loop
async def test_P_hides_a_model_from_v1_models_and_pi_and_shows_it_again(gateway, tmp_path):
    pi_dir = tmp_path / "pi"
    apply_gateway(gateway, tmp_path, f"  integrations: {{pi: {{sync: true, dir: {json.dumps(str(pi_dir))}}}}}\n")

    def pi_models() -> set[str]:
        return {m["id"] for m in json.loads((pi_dir / "models.json").read_text())["providers"]["athanor"]["models"]}

    assert pi_models() == {"tiny-gguf", "tiny-mlx"}
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        models = table(app)
        await until(pilot, lambda: models.cell("tiny-gguf", "markers") == "[alias] [pi] [tuned]", "the [pi] marker")
        assert models.cell("tiny-mlx", "markers") == "[pi] [tuned]" and models.selected == "tiny-gguf"

        await pilot.press("P")
        await until(pilot, lambda: models.cell("tiny-gguf", "markers") == "[alias] [tuned] [hidden]", "[hidden]")
        assert await asyncio.to_thread(listed, gateway) == {"tiny-mlx"}  # the daemon saw the store change
        assert pi_models() == {"tiny-mlx"}  # and pi followed, as after the CLI
        assert open_store(gateway.home).models.load()["models"]["tiny-gguf"]["spec"]["publish"] is False
        assert (await asyncio.to_thread(chat, gateway.client, "tiny-gguf")).choices  # hidden, still served by name
        pid = gateway.runtime_pid("tiny-gguf")

        await pilot.press("P")
        await until(pilot, lambda: models.cell("tiny-gguf", "markers") == "[alias] [pi] [tuned]", "exposed again")
        assert await asyncio.to_thread(listed, gateway) == {"tiny-gguf", "tiny-mlx"}
        assert gateway.runtime_pid("tiny-gguf") == pid  # a listing change: the running model is not restarted
        assert pi_models() == {"tiny-gguf", "tiny-mlx"}
        await pilot.press("q")


@in_loop
async def test_d_asks_then_asks_about_the_weights_and_deletes_the_model_keeping_or_removing_them(gateway, tmp_path):
    gguf, mlx = tmp_path / "weights" / "tiny.gguf", tmp_path / "weights" / "tiny-mlx"
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        models = table(app)
        await until(pilot, lambda: models.cell("tiny-mlx", "phase") == "Standby", "the table")
        assert models.selected == "tiny-gguf"

        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete question")
        await pilot.press("n")  # no: nothing happens
        await until(pilot, lambda: app.screen is app.main, "the question to close")
        assert models.cell("tiny-gguf", "phase") == "Standby"

        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete question")
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and "--files" in app.screen.question,
                    "the separate question about the weights")
        assert str(gguf) in app.screen.question  # the CLI's plan: what --files would remove
        await pilot.press("n")
        await until(pilot, lambda: models.cell("tiny-gguf", "phase") is None, "the row to go")
        assert "tiny-gguf" not in open_store(gateway.home).models.load()["models"]
        assert gguf.is_file()  # the weights stay
        assert models.selected == "tiny-mlx"

        await pilot.press("d")  # the other one, with its weights
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the delete question")
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and "--files" in app.screen.question,
                    "the question about the weights")
        await pilot.press("y")
        await until(pilot, lambda: models.row_count == 0 and not mlx.exists(), "tiny-mlx and its directory to go")
        assert open_store(gateway.home).models.load()["models"] == {}
        assert any(f"removed {mlx}" in n for n in notices(app)), notices(app)
        await pilot.press("q")


@in_loop
async def test_s_rescans_and_registers_a_gguf_dropped_into_a_watched_directory(gateway, tmp_path):
    from fixtures.tiny_models import write_tiny_llama_gguf

    watched = tmp_path / "watched"
    watched.mkdir()
    apply_gateway(gateway, tmp_path, f"  discovery: {{hfCache: false, paths: [{json.dumps(str(watched))}]}}\n")
    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        models = table(app)
        await until(pilot, lambda: models.row_count == 2, "the table")
        write_tiny_llama_gguf(watched / "dropped.gguf", seed=5)
        await pilot.press("s")
        # The daemon's own watcher may register it first; either way the model is there and s said what it did.
        await until(pilot, lambda: models.row_count == 3, "the dropped model in the table")
        await until(pilot, lambda: any(n.startswith("scan: ") for n in notices(app)), "the scan's summary")
        doc = open_store(gateway.home).models.load()
        new = next(name for name in doc["models"] if name not in ("tiny-gguf", "tiny-mlx"))
        assert doc["models"][new]["artifact"]["path"] == str(watched / "dropped.gguf")
        assert models.cell(new, "phase") == "Standby"
        await pilot.press("q")


@in_loop
async def test_f_switches_an_mlx_model_to_mlx_vlm_and_back_and_says_no_for_a_gguf(gateway):
    def runtime(name: str) -> str:
        return open_store(gateway.home).models.load()["models"][name]["spec"]["runtime"]

    app = AthanorApp()
    async with app.run_test(size=SIZE) as pilot:
        models = table(app)
        await until(pilot, lambda: models.cell("tiny-mlx", "phase") == "Standby", "the table")
        await pilot.press("f")  # tiny-gguf is a GGUF: a notice, nothing changes
        await until(pilot, lambda: any("for MLX models" in n for n in notices(app)), "the notice")
        assert runtime("tiny-gguf") == "llama-server"

        await pilot.press("down", "f")
        await until(pilot, lambda: models.cell("tiny-mlx", "runtime") == "mlx-vlm", "the vlm flavor")
        assert runtime("tiny-mlx") == "mlx-vlm"
        live = json.loads(urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=30).read())
        assert "tiny-mlx" in {m["id"] for m in live["data"]}
        await pilot.press("f")
        await until(pilot, lambda: models.cell("tiny-mlx", "runtime") == "mlx-lm", "back to lm")
        assert runtime("tiny-mlx") == "mlx-lm"
        await pilot.press("q")


def test_the_pi_marker_sits_with_the_others():
    from athanor.tui import format as fmt

    model = {"metadata": {"name": "m"}, "spec": {"aliases": ["a"], "preset": {"ctxSize": 1}}}
    assert fmt.row(model, pi=True)["markers"] == "[alias] [pi] [tuned]"
    assert fmt.row(model)["markers"] == "[alias] [tuned]"


# ---------------------------------------------------------------------------------- snapshots


FROZEN_PID = 4242


class FrozenSession:
    """A real session on the real daemon whose answers have their volatile figures fixed (machine, memory, load,
    uptime, pids, ports, process figures, telemetry) and whose streams stay silent, so a snapshot of the main view
    is the same on every run and machine. Only the snapshots use it."""

    def __init__(self, real: Any) -> None:
        from athanor.tui.client import Target

        self.real = real
        self.target = Target(real.target.admin, "127.0.0.1:8080", FROZEN_PID, real.target.key)

    async def get(self, path: str, timeout: float = 5.0) -> Any:
        return frozen(path, await self.real.get(path, timeout))

    async def post(self, path: str, timeout: float = 600.0) -> Any:
        return await self.real.post(path, timeout)

    async def stream(self, path: str, read_timeout: float):
        await asyncio.Event().wait()  # nothing ever arrives (the worker is cancelled when the app ends)
        yield "message", None

    async def close(self) -> None:
        await self.real.close()


def frozen(path: str, answer: Any) -> Any:
    if path == "/status":
        return {**answer, "pid": FROZEN_PID}
    if path == "/daemon":
        return {**answer, "version": "0.1.0", "listen": "127.0.0.1:8080", "uptimeSeconds": 3723,
                "machine": {"cpu": "Test CPU", "cores": 8, "load": [0.5, 0.25, 0.12]},
                "memory": {**answer.get("memory", {}), "usedBytes": 12 << 30, "totalBytes": 32 << 30}}
    if path.startswith("/telemetry"):
        return {"items": []}
    if path == "/models":
        items = []
        for n, model in enumerate(answer["items"]):
            status = {"phase": model["status"]["phase"], "port": 8101 + n, "fit": model["status"].get("fit")}
            items.append({**model, "spec": {**model["spec"], "port": 8101 + n}, "status": status})
        return {**answer, "items": items}
    return answer


async def frozen_connect() -> Any:
    from athanor.tui.screens.main import connect_to_daemon

    real = await connect_to_daemon()
    return real if isinstance(real, str) else FrozenSession(real)


def frozen_app() -> AthanorApp:
    from athanor.tui.screens.main import MainScreen

    app = AthanorApp()
    app.main = MainScreen(connect=frozen_connect)
    return app


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_snapshot_of_the_main_view(gateway, snap_compare, size):
    app = frozen_app()

    async def ready(pilot) -> None:
        models = table(app)
        await until(pilot, lambda: models.cell("tiny-mlx", "phase") == "Standby" and not banner(app), "the table")
        await until(pilot, lambda: "Test CPU" in str(app.main.query_one("#header").render()), "the header")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_snapshot_of_the_empty_state(empty_home, snap_compare, size):
    from athanor.tui.widgets.panes import EmptyState

    up = subprocess.run([ATHANOR, "up"], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    app = frozen_app()

    async def ready(pilot) -> None:
        empty = app.main.query_one(EmptyState)
        await until(pilot, lambda: empty.display and "athanor pull" in str(empty.render()) and not banner(app)
                    and "Test CPU" in str(app.main.query_one("#header").render()), "the starters")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=ready)
