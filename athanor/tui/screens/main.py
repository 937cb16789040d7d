"""The main view: the header, the model table, the selected model's log tail and the event feed.

This screen owns the connection to the daemon. One worker attaches (every second while there is no daemon) and
then refreshes the table from the admin API at least once a second, sooner when an event arrives; one follows the
event stream; one follows the selected model's log. All of them are async and bounded by timeouts, so a slow or
failed admin call delays a refresh and never the keyboard. Start, stop and restart are POSTs to the admin API in
workers of their own; expose/hide, delete, rescan and the MLX flavor are the CLI's own library calls, run in a thread
(``tui/model_actions.py``). The screen holds no logic about models beyond what to ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input
from textual.worker import Worker

from athanor.tui import format as fmt
from athanor.tui import model_actions
from athanor.tui.client import AdminSession, AdminUnavailable, Target, locate, model_path
from athanor.tui.screens.dialogs import ConfirmScreen
from athanor.tui.widgets.models import ModelTable
from athanor.tui.widgets.panes import Banner, EmptyState, EventFeed, HeaderBar, LogTail

ATTACH_EVERY_S = 1.0  # how often the screen tries to attach while there is no daemon
REFRESH_EVERY_S = 1.0  # the longest the table goes without a refresh while attached
NOT_YET: dict[str, str] = {}  # the original tool's keys not in the TUI yet (each says so when pressed)


async def connect_to_daemon() -> AdminSession | str:
    """A session on the running daemon once it answers, or a one-line reason why there is none."""
    found = await asyncio.to_thread(locate, None)
    if isinstance(found, str):
        return found
    session = AdminSession(found)
    try:
        await session.get("/status")
    except AdminUnavailable as exc:
        await session.close()
        return f"the gateway (pid {found.pid}) does not answer: {exc}"
    return session


class MainScreen(Screen[None]):
    VIEW = "models"
    BINDINGS = [
        Binding("enter", "toggle", "start/stop", priority=True),
        Binding("r", "restart", "restart"),
        Binding("k", "kill", "kill"),
        Binding("tab,l", "logs", "logs", key_display="Tab"),
        Binding("i", "describe", "desc"),
        Binding("space", "mark", "mark", key_display="space"),
        Binding("t", "telemetry", "telemetry"),
        Binding("e", "preset", "preset"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("escape", "back", "back", show=False),
        Binding("P", "publish", "expose"),
        Binding("d", "delete", "delete"),
        Binding("s", "rescan", "rescan"),
        Binding("f", "flavor", "flavor"),
        Binding("S", "search", "search"),
        Binding("p", "pull", "pull"),
        Binding("D", "downloads", "pulls"),
        Binding("u", "up", "up"),
        *(Binding(key, f"not_yet('{key}')", f"{what} (not yet)", show=False) for key, what in NOT_YET.items()),
    ]
    DEFAULT_CSS = """
    MainScreen Banner { background: $error; color: $text; padding: 0 1; display: none; }
    MainScreen Banner.shown { display: block; }
    MainScreen HeaderBar { background: $boost; padding: 0 1; height: auto; }
    MainScreen ModelTable { height: 1fr; min-height: 5; }
    MainScreen EmptyState { height: 1fr; padding: 1 2; display: none; }
    MainScreen #panes { height: 45%; min-height: 8; }
    MainScreen LogTail { width: 3fr; border: round $primary; border-title-align: left; overflow: auto auto; }
    MainScreen EventFeed { width: 2fr; border: round $primary; border-title-align: left; overflow: auto auto; }
    MainScreen #filter { dock: bottom; display: none; }
    MainScreen #filter.shown { display: block; }
    """

    def __init__(self, connect: Callable[[], Awaitable[AdminSession | str]] | None = None) -> None:
        super().__init__()
        self._connect = connect or connect_to_daemon
        self.session: AdminSession | None = None
        self.models: dict[str, dict[str, Any]] = {}  # the daemon's last view of each model, by name
        self.instances: dict[str, dict[str, Any]] = {}  # /status's instances (in-flight and waiting counts)
        self.pattern: re.Pattern[str] | None = None
        self.gone_from: int | None = None  # pid of the daemon that went away, for the banner
        self.starting_gateway = False
        self._refresh_now = asyncio.Event()
        self._log_for: str | None = None
        self._telemetry = True  # until the daemon says it has no /telemetry
        self._daemon_facts = True  # until the daemon says it has no /daemon
        self._tokens: dict[str, float] = {}
        self.marked: set[str] = set()  # models the telemetry view compares (space marks; none marked: all)
        self._events_worker: Worker[None] | None = None
        self._pi = model_actions.PiWatch()
        self._pi_names: frozenset[str] = frozenset()  # the models pi's provider lists ([pi])

    def compose(self) -> ComposeResult:
        yield Banner("", id="banner")
        yield HeaderBar("athanor: attaching...", id="header")
        yield ModelTable(id="models")
        yield EmptyState("", id="empty")
        with Horizontal(id="panes"):
            yield LogTail(id="logtail")
            yield EventFeed(id="events")
        yield Input(placeholder="filter by regex (Enter keeps it, esc clears it)", id="filter")
        yield Footer(compact=True)  # every key of this view fits in 160 columns; ? lists them all

    def on_mount(self) -> None:
        self.query_one(LogTail).border_title = "log"
        self.query_one(EventFeed).border_title = "events"
        self.query_one(ModelTable).focus()
        self._say_detached("the gateway is not running")
        self.attach_and_refresh()

    async def on_unmount(self) -> None:
        if self.session:
            await self.session.close()

    # ------------------------------------------------------------------ the connection

    @property
    def attached(self) -> bool:
        return self.session is not None

    @work(exclusive=True, group="attach")
    async def attach_and_refresh(self) -> None:
        """Attach when there is a daemon, refresh while attached, and go back to attaching when it goes away."""
        while True:
            if self.session is None:
                await self._try_attach()
            if self.session is not None:
                try:
                    await self._refresh()
                except AdminUnavailable as exc:
                    await self._lose_daemon(str(exc))
                except Exception as exc:  # noqa: BLE001 - an answer this TUI cannot read: said, and tried again
                    self.notify(f"refresh failed: {type(exc).__name__}: {exc}", severity="error", timeout=5)
            self._refresh_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_now.wait(),
                                       REFRESH_EVERY_S if self.session else ATTACH_EVERY_S)

    async def _try_attach(self) -> None:
        session = await self._connect()
        if isinstance(session, str):
            self._say_detached(session)
            return
        self.session, self.gone_from = session, None
        self._telemetry = self._daemon_facts = True
        self.query_one(Banner).remove_class("shown")
        self._events_worker = self.follow_events(session)
        self.follow_status(session)
        self._log_for = None
        self._follow_selected()

    async def _lose_daemon(self, reason: str) -> None:
        session, self.session = self.session, None
        if session is not None:
            self.gone_from = session.target.pid
            await session.close()
        self.workers.cancel_group(self, "events")
        self.workers.cancel_group(self, "status")
        self.workers.cancel_group(self, "log")
        self._log_for = None
        self._say_detached(reason)

    def _say_detached(self, reason: str) -> None:
        if self.starting_gateway:
            text = "starting the gateway (athanor up)..."
        elif self.gone_from is not None:
            text = (f"the gateway (pid {self.gone_from}) went away: {reason}. Trying to attach again every second; "
                    "u starts it (athanor up).")
        else:
            text = f"{reason}. Press u to start it (athanor up); trying to attach every second."
        banner = self.query_one(Banner)
        banner.update(Text(text))
        banner.add_class("shown")

    async def _refresh(self) -> None:
        """One look at the daemon: status, models, and (when the daemon has them) its own facts and telemetry."""
        session = self.session
        assert session is not None
        status = await session.get("/status")
        if isinstance(status, dict) and status.get("pid") not in (None, session.target.pid):
            raise AdminUnavailable(f"another gateway (pid {status['pid']}) answers there now")  # attach to it anew
        if self._events_worker is None or self._events_worker.is_finished:
            self._events_worker = self.follow_events(session)  # its stream ended while the daemon stayed
        listing = await session.get("/models")
        daemon = await self._optional(session, "/daemon", "_daemon_facts")
        if self._telemetry:
            records = await self._optional(session, "/telemetry?limit=200", "_telemetry")
            if isinstance(records, dict):
                self._tokens = {}
                for record in records.get("items", []):
                    rate = record.get("decodeTokensPerSecond")
                    if record.get("model") not in self._tokens and isinstance(rate, (int, float)):
                        self._tokens[record["model"]] = rate
        with contextlib.suppress(Exception):  # an unreadable store: no [pi] markers, the table still shows
            self._pi_names = await asyncio.to_thread(self._pi.names)
        self.instances = status.get("instances", {}) if isinstance(status, dict) else {}
        items = listing.get("items", []) if isinstance(listing, dict) else []
        self.models = {m["metadata"]["name"]: m for m in items if isinstance(m, dict) and "metadata" in m}
        self.query_one(HeaderBar).update(Text(fmt.header(daemon if isinstance(daemon, dict) else None,
                                                     session.target.listen, status.get("pid") or session.target.pid)))
        self._show_models(daemon if isinstance(daemon, dict) else None)

    async def _optional(self, session: AdminSession, path: str, flag: str) -> Any:
        """An endpoint a daemon may not have yet: None (and not asked again until the next attach) on a 404."""
        if not getattr(self, flag):
            return None
        try:
            return await session.get(path)
        except AdminUnavailable as exc:
            if exc.status == 404:
                setattr(self, flag, False)
                return None
            if exc.status is not None:
                return None  # an error of that endpoint alone: the rest of the refresh stands
            raise

    def _show_models(self, daemon: dict[str, Any] | None) -> None:
        table, empty = self.query_one(ModelTable), self.query_one(EmptyState)
        if not self.models:
            table.display = False
            empty.display = True
            empty.update(Text(self._starters(daemon)))  # plain text: its indentation kept, no markup
        else:
            table.display, empty.display = True, False
        rows = {name: fmt.row(model, self._tokens.get(name), pi=name in self._pi_names)
                for name, model in self.models.items()}
        for name in self.marked & rows.keys():
            rows[name]["markers"] = f"[marked] {rows[name]['markers']}".rstrip(" -")
        table.show(rows, self.pattern)
        self._follow_selected()

    @staticmethod
    def _starters(daemon: dict[str, Any] | None) -> str:
        from athanor.hub.starters import suggestions

        total = ((daemon or {}).get("memory") or {}).get("totalBytes")
        if not isinstance(total, int):
            import psutil

            total = psutil.virtual_memory().total
        tier, picks = suggestions(total)
        lines = [f"No models registered. Pull one that fits this machine ({tier} tier; Enter picks one), or press "
                 "'s' to find models already on disk:", ""]
        lines += [f"  {s.pull}\n      {s.what}" for s in picks]
        lines += ["", "More: S searches the Hub, sorted by fit"]
        return "\n".join(lines)

    # ------------------------------------------------------------------ streams

    @work(exclusive=True, group="events")
    async def follow_events(self, session: AdminSession) -> None:
        from athanor import heartbeat

        feed = self.query_one(EventFeed)
        feed.clear()
        try:
            async for kind, event in session.stream("/events?follow=1", heartbeat.read_timeout()):
                if kind == "message" and isinstance(event, dict):
                    if event.get("kind") == "Model" or event.get("type") == "Warning":
                        feed.write_line(fmt.event_line(event))
                    self._refresh_now.set()
        except AdminUnavailable:
            self._refresh_now.set()  # the refresh finds out whether the daemon is still there

    @work(exclusive=True, group="status")
    async def follow_status(self, session: AdminSession) -> None:
        """In-flight and waiting counts as they change, from the status feed when the daemon has one (an older
        daemon answers 404 and the once-a-second refresh carries them instead)."""
        from athanor import heartbeat

        with contextlib.suppress(AdminUnavailable):
            async for kind, status in session.stream("/status?follow=1", heartbeat.read_timeout()):
                if kind == "status" and isinstance(status, dict):
                    self.instances = status.get("instances", self.instances)

    def _follow_selected(self) -> None:
        name = self.query_one(ModelTable).selected
        if name != self._log_for and self.session is not None:
            self._log_for = name
            tail = self.query_one(LogTail)
            tail.clear()
            tail.border_title = f"log: {name}" if name else "log"
            if name:
                self.follow_log(self.session, name)
            else:
                self.workers.cancel_group(self, "log")

    @work(exclusive=True, group="log")
    async def follow_log(self, session: AdminSession, name: str) -> None:
        """The selected model's log from its last lines on, across restarts; tried again every second when the
        stream fails (the model may have no log yet)."""
        from athanor import heartbeat

        tail = self.query_one(LogTail)
        while self._log_for == name and self.session is session:
            try:
                async for _, piece in session.stream(f"{model_path(name)}/logs?follow=1&lines=50",
                                                     heartbeat.read_timeout()):
                    text = piece.get("text", "") if isinstance(piece, dict) else str(piece)
                    tail.write(text)
            except AdminUnavailable:
                pass
            await asyncio.sleep(ATTACH_EVERY_S)  # retry interval for a log that cannot be followed yet

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._follow_selected()

    # ------------------------------------------------------------------ actions

    def _selected(self) -> str | None:
        name = self.query_one(ModelTable).selected if self.models else None
        if name is None:
            self.notify("no model selected" if self.attached else "not attached to a gateway", severity="warning")
        return name

    def _busy(self, name: str) -> bool:
        inst = self.instances.get(name, {})
        return bool(inst.get("inflight") or inst.get("waiting"))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Enter starts or stops only from the table: in the filter field it ends the filter."""
        if action == "toggle" and isinstance(self.focused, Input):
            return False
        return True

    def action_toggle(self) -> None:
        if self.attached and not self.models:  # the empty state: Enter pulls one of the starters it shows
            self._pick_starter()
            return
        name = self._selected()
        if name is None:
            return
        live = (self.models[name].get("status") or {}).get("phase") in fmt.LIVE_PHASES
        if not live:
            self.act(name, "start")
        elif self._busy(name):
            self._confirm(f"{name} is serving requests. Stop it (it drains them first)?", name, "stop")
        else:
            self.act(name, "stop")

    def action_restart(self) -> None:
        if (name := self._selected()) is not None:
            self._confirm(f"Restart {name}?", name, "restart")

    def action_kill(self) -> None:
        # The admin API has no kill without draining: k stops (SIGTERM, then SIGKILL after the grace).
        if (name := self._selected()) is not None:
            self._confirm(f"Kill {name}? (stops it now: the admin API has no kill without draining)", name, "stop")

    def _confirm(self, question: str, name: str, action: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.act(name, action)

        self.app.push_screen(ConfirmScreen(question), answered)

    @work(group="actions")
    async def act(self, name: str, action: str) -> None:
        session = self.session
        if session is None:
            self.notify("not attached to a gateway", severity="warning")
            return
        self.notify(f"{action} {name}...")
        self._refresh_now.set()
        try:
            answer = await session.post(f"{model_path(name)}/{action}")
        except AdminUnavailable as exc:
            self.notify(f"{action} {name}: {exc}", severity="error", timeout=8)
        else:
            phase = answer.get("phase", "-") if isinstance(answer, dict) else "-"
            self.notify(f"{name}: {phase}")
        self._refresh_now.set()

    def action_logs(self) -> None:
        if (name := self._selected()) is not None:
            self.app.open_logs(name)  # type: ignore[attr-defined]

    def action_describe(self) -> None:
        if (name := self._selected()) is not None:
            self.app.open_describe(name)  # type: ignore[attr-defined]

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.add_class("shown")
        field.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        try:
            self.pattern = re.compile(event.value, re.IGNORECASE) if event.value else None
        except re.error:
            return  # keep the last pattern that compiled while the user types
        self._show_models(None)

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        field = self.query_one("#filter", Input)
        if not field.value:
            field.remove_class("shown")
        self.query_one(ModelTable).focus()

    def action_back(self) -> None:
        field = self.query_one("#filter", Input)
        if field.value or field.has_class("shown"):
            field.value = ""
            field.remove_class("shown")
            self.pattern = None
            self._show_models(None)
            self.query_one(ModelTable).focus()

    def action_mark(self) -> None:
        """Mark or unmark the selected model for the telemetry view's comparison."""
        if (name := self._selected()) is not None:
            self.marked ^= {name}
            self._show_models(None)

    def action_telemetry(self) -> None:
        from athanor.tui.screens.telemetry import TelemetryScreen

        self.app.push_screen(TelemetryScreen(sorted(self.marked) or None))

    def action_preset(self) -> None:
        if (name := self._selected()) is not None:
            from athanor.tui.screens.preset import PresetScreen

            self.app.push_screen(PresetScreen(name))

    # ------------------------------------------------------------------ store writes (the CLI's library calls)

    def action_publish(self) -> None:
        """``P``: hide the model from /v1/models and pi, or expose it again (``spec.publish``)."""
        if (name := self._selected()) is not None:
            hidden = (self.models[name].get("spec") or {}).get("publish") is False
            self.write_store(f"{'expose' if hidden else 'hide'} {name}", model_actions.set_publish, name, hidden)

    def action_delete(self) -> None:
        """``d``: delete the model after a yes; then a second question, whether its weights go too (``--files``)."""
        if (name := self._selected()) is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.ask_about_files(name)

        self.app.push_screen(ConfirmScreen(f"Delete model {name}? (athanor delete model {name})"), answered)

    @work(group="store")
    async def ask_about_files(self, name: str) -> None:
        """Show what ``--files`` would remove (the CLI's plan) and ask; the model is deleted either way."""
        try:
            planned = await asyncio.to_thread(model_actions.plan_files, name)
        except Exception as exc:  # noqa: BLE001 - the library's message, as the CLI would print it
            self.notify(f"delete {name}: {exc}", severity="error", timeout=8)
            return
        if not planned.removals:
            self.write_store(f"delete {name}", model_actions.delete, name, None)
            return
        total = fmt.size(planned.size_bytes)
        question = "\n".join([f"Also remove {name}'s weights from disk ({total})? (--files)", *planned.lines()])
        question = escape(question)  # paths are text, not markup

        def answered(yes: bool | None) -> None:
            self.write_store(f"delete {name}", model_actions.delete, name, planned if yes else None)

        self.app.push_screen(ConfirmScreen(question), answered)

    def action_rescan(self) -> None:
        """``s``: ``athanor scan``."""
        self.write_store("rescan", model_actions.rescan)

    def action_flavor(self) -> None:
        """The MLX flavor switch: mlx-lm (text) to mlx-vlm (images too) and back, as ``athanor flavor``."""
        if (name := self._selected()) is None:
            return
        runtime = (self.models[name].get("spec") or {}).get("runtime")
        if runtime not in model_actions.MLX_FLAVORS:
            self.notify(f"{name} runs on {runtime or 'an unknown runtime'}: the flavor switch is for MLX models",
                        severity="warning")
            return
        self.write_store(f"flavor {name}", model_actions.switch_flavor, name, runtime)

    @work(group="store")
    async def write_store(self, what: str, call: Callable[..., list[str]], *args: Any) -> None:
        """Run one of ``model_actions``' store writes in a thread and say what it did; the daemon sees the change
        at once, and the table follows on the refresh this asks for."""
        try:
            lines = await asyncio.to_thread(call, *args)
        except Exception as exc:  # noqa: BLE001 - the library's message (an unknown model, a locked store), said
            self.notify(f"{what}: {exc}", severity="error", timeout=8)
        else:
            self.notify("\n".join(lines) or what, timeout=6)
        self._refresh_now.set()

    def action_search(self) -> None:
        self.app.open_search()  # type: ignore[attr-defined]

    def action_downloads(self) -> None:
        self.app.open_downloads()  # type: ignore[attr-defined]

    def action_pull(self) -> None:
        from athanor.tui.screens.dialogs import pull_prompt

        def asked(text: str | None) -> None:
            if text:
                repo, *files = text.split()
                self._pull(repo, tuple(files))

        self.app.push_screen(pull_prompt(), asked)

    def _pull(self, repo: str, files: tuple[str, ...]) -> None:
        """Queue a pull in the app's downloads (it goes on whatever view is open) and show the downloads."""
        self.app.downloads.pull(repo, files)  # type: ignore[attr-defined]
        self.app.open_downloads()  # type: ignore[attr-defined]

    def _pick_starter(self) -> None:
        import psutil

        from athanor.hub.starters import suggestions
        from athanor.tui.screens.dialogs import StarterPicker

        _, picks = suggestions(psutil.virtual_memory().total)

        def chosen(index: int | None) -> None:
            if index is not None:
                self._pull(picks[index].repo, (picks[index].file,) if picks[index].file else ())

        self.app.push_screen(StarterPicker([f"{s.repo}  {s.file or ''}  - {s.what}" for s in picks]), chosen)

    def action_not_yet(self, key: str) -> None:
        self.notify(f"{key} ({NOT_YET[key]}): not yet in the TUI; use the athanor CLI", severity="warning")

    def action_up(self) -> None:
        if self.attached:
            self.notify("the gateway is already running")
        elif not self.starting_gateway:
            self.start_gateway()

    @work(group="up")
    async def start_gateway(self) -> None:
        """``athanor up`` (the same code, in a process of its own, so its output stays off the screen); the attach
        loop finds the daemon once it serves."""
        self.starting_gateway = True
        self._say_detached("")
        try:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "athanor", "up",
                                                        stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
        finally:
            self.starting_gateway = False
        said = out.decode("utf-8", "replace").strip().splitlines()
        self.notify(said[-1] if said else f"athanor up exited with {proc.returncode}",
                    severity="information" if proc.returncode == 0 else "error", timeout=8)
        self._refresh_now.set()


__all__ = ["MainScreen", "Target"]
