"""The pulls under way in this TUI process: ``athanor pull``'s own library calls (athanor.hub.pull) run one at a time
in a thread of their own, so a download goes on while the user moves between views.

A ``Downloads`` lives on the App (``app.downloads``; ``downloads_of(app)`` makes one when there is none). Each pull
is a ``Download``, an immutable snapshot replaced at every step:

    queued -> downloading (listing, fit check, then bytes done / total) -> registered (the model names)
                                               -> failed (one line: the Hub's refusal, a fit refusal, cancelled)

The steps are the CLI's: plan, check_fit (a model that cannot fit is refused, as without --force), check_disk,
download with a ``Progress`` (pull.py's progress hook), register (the daemon's discovery: a running gateway serves
the model at once), then pi's sync as after ``athanor pull``. Views learn of changes through ``DownloadChanged``
messages, posted (thread-safely) to every node that called ``watch``; progress is posted at most every
``PUBLISH_EVERY_S``, every change of state at once. When a pull ends, the app shows a notice wherever the user is.

Cancelling (``cancel``) makes the next chunk the download writes raise ``PullCancelled``: huggingface_hub removes the
file it was writing and nothing is registered, as after Ctrl-C of ``athanor pull``. The threads are daemon threads;
``close`` (also run at interpreter exit) cancels what is left and waits a moment for it, so quitting the TUI never
waits for a download to finish.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import itertools
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import events
from textual.message import Message

if TYPE_CHECKING:
    from textual.app import App
    from textual.message_pump import MessagePump

    from athanor.hub.pull import Plan, PullFile

QUEUED, DOWNLOADING, REGISTERED, FAILED = "queued", "downloading", "registered", "failed"
STATES = (QUEUED, DOWNLOADING, REGISTERED, FAILED)
PUBLISH_EVERY_S = 0.1  # the most often progress is posted to the views (a state change is posted at once)
CLOSE_WAIT_S = 5.0  # how long quitting waits for a cancelled pull to stop


class PullCancelled(Exception):
    """Raised inside the download (from its progress hook) when the user cancelled the pull."""


@dataclass(frozen=True)
class Download:
    """One pull as the views show it (a snapshot: the thread replaces it, never changes it)."""

    id: int
    repo: str
    only: tuple[str, ...] = ()  # the files asked for (``athanor pull REPO --file F``); empty: what pull chooses
    state: str = QUEUED
    done: int = 0  # bytes downloaded by this pull
    total: int = 0  # bytes to download (files already in the cache are not counted)
    file: str | None = None  # the file being fetched
    files: int = 0  # how many files the pull fetches, cached ones included
    models: tuple[str, ...] = ()  # registered: the model names
    error: str | None = None  # failed: why, one line
    notes: tuple[str, ...] = ()  # the fit verdict, warnings, registration notes
    cancelling: bool = False  # the user cancelled it: it stops at the next chunk the download writes

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, DOWNLOADING)

    @property
    def fraction(self) -> float | None:
        """How much of the download is done (0..1), or None before its size is known."""
        if self.state == REGISTERED:
            return 1.0
        if self.total <= 0:
            return None
        return min(1.0, max(0.0, self.done / self.total))


class DownloadChanged(Message):
    """A pull changed (progress or state); ``download`` is its new snapshot."""

    def __init__(self, download: Download) -> None:
        super().__init__()
        self.download = download


class Downloads:
    """The pulls of this TUI process, in the order they were asked for; one runs at a time, the others wait."""

    def __init__(self, app: App[Any] | None = None, home: Path | None = None) -> None:
        self.app = app
        self.home = home  # ATHANOR_HOME when None
        self._lock = threading.Lock()
        self._items: dict[int, Download] = {}
        self._cancelled: set[int] = set()
        self._queue: collections.deque[int] = collections.deque()
        self._runner: threading.Thread | None = None
        self._watchers: weakref.WeakSet[MessagePump] = weakref.WeakSet()
        self._ids = itertools.count(1)
        _LIVE.add(self)

    # ------------------------------------------------------------------------------------------ what views use

    @property
    def items(self) -> list[Download]:
        """Every pull of this session, oldest first."""
        with self._lock:
            return list(self._items.values())

    def get(self, download_id: int) -> Download | None:
        with self._lock:
            return self._items.get(download_id)

    @property
    def active(self) -> list[Download]:
        return [d for d in self.items if d.active]

    def watch(self, node: MessagePump) -> None:
        """Post ``DownloadChanged`` to ``node`` from now on (until it is gone)."""
        with self._lock:
            self._watchers.add(node)

    def pull(self, repo: str, files: tuple[str, ...] = ()) -> Download:
        """Queue a pull of ``repo`` (the files ``athanor pull REPO [--file F]`` fetches). A repo already queued or
        downloading is not pulled twice: its download is returned."""
        with self._lock:
            same = next((d for d in self._items.values() if d.repo == repo and d.active), None)
            if same is not None:
                return same
            download = Download(next(self._ids), repo, tuple(files))
            self._items[download.id] = download
            self._queue.append(download.id)
            if self._runner is None:
                self._runner = threading.Thread(target=self._run, name="athanor-tui-pull", daemon=True)
                self._runner.start()
        self._publish(download)
        return download

    def cancel(self, download_id: int) -> bool:
        """Stop a queued or downloading pull (nothing is registered); False when it is not under way."""
        with self._lock:
            download = self._items.get(download_id)
            if download is None or not download.active:
                return False
            self._cancelled.add(download_id)
            queued = download_id in self._queue
            if queued:
                self._queue.remove(download_id)
        if queued:
            self._finish(download_id, error="cancelled before it started")
        else:
            self._update(download_id, cancelling=True)
        return True

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Cancel every pull under way and wait (at most ``timeout``) for the running one to stop."""
        for download in self.active:
            self.cancel(download.id)
        runner = self._runner
        if runner is not None and runner is not threading.current_thread():
            runner.join(timeout)

    # ------------------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._runner = None
                    return
                download_id = self._queue.popleft()
            self._pull(download_id)

    def _pull(self, download_id: int) -> None:
        from athanor.errors import AthanorError
        from athanor.hub import pull
        from athanor.store import open_store

        repo, files = self._items[download_id].repo, self._items[download_id].only
        try:
            self._check(download_id)
            self._update(download_id, state=DOWNLOADING)  # listing its files and checking the fit, first
            store = open_store(self.home)
            plan = pull.plan(repo, files=files, cache_dir=pull.cache_dir(store.models.load()))
            notes = [note.text for note in pull.check_fit(plan)]
            pull.check_disk(plan)
            self._update(download_id, state=DOWNLOADING, total=plan.download_bytes, files=len(plan.files),
                         notes=tuple(notes))
            pull.download(plan, _Progress(self, download_id))
            registration = pull.register(plan, store)
        except PullCancelled:
            self._finish(download_id, error="cancelled: nothing was registered")
            return
        except (AthanorError, OSError) as exc:
            self._finish(download_id, error=_one_line(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a pull that breaks is shown as failed, the TUI goes on
            self._finish(download_id, error=f"{type(exc).__name__}: {_one_line(exc)}")
            return
        names = tuple(r.name for r in registration.models if r.name)
        problems = [r.problem for r in registration.models if r.problem]
        notes = [*self._items[download_id].notes, *registration.warnings,
                 *(note for r in registration.models for note in r.notes)]
        if any(r.action == "discovered" for r in registration.models):
            notes += _sync_pi(store)
        if problems or not names:
            error = problems[0] if problems else f"{repo}: none of its files is a model on its own; nothing registered"
            self._finish(download_id, error=error, models=names, notes=tuple(notes))
        else:
            self._finish(download_id, state=REGISTERED, models=names, notes=tuple(notes))

    def _check(self, download_id: int) -> None:
        if download_id in self._cancelled:
            raise PullCancelled

    def _update(self, download_id: int, *, publish: bool = True, **changes: Any) -> Download:
        with self._lock:
            download = dataclasses.replace(self._items[download_id], **changes)
            self._items[download_id] = download
        if publish:
            self._publish(download)
        return download

    def _finish(self, download_id: int, *, state: str = FAILED, error: str | None = None, **changes: Any) -> None:
        download = self._update(download_id, state=state, error=error, file=None, cancelling=False, **changes)
        if state == REGISTERED:
            names = ", ".join(f"model/{name}" for name in download.models)
            self._notify(f"{download.repo} pulled: {names}", "information")
        else:
            self._notify(f"pull of {download.repo} failed: {error}", "warning" if "cancelled" in (error or "")
                         else "error")

    def _publish(self, download: Download) -> None:
        """Tell the watching views (and the app) of ``download``: thread-safe, never waits for them."""
        with self._lock:
            watchers = list(self._watchers)
        for node in [*watchers, *([self.app] if self.app is not None else [])]:
            if node.is_running:
                node.post_message(DownloadChanged(download))

    def _notify(self, message: str, severity: str) -> None:
        app = self.app
        if app is not None and app.is_running:  # a Callback message: posting is thread-safe, notify is not
            app.post_message(events.Callback(callback=functools.partial(app.notify, message, severity=severity,
                                                                        timeout=8)))


class _Progress:
    """pull.download's Progress (athanor.hub.pull.Progress) feeding one Download; also where a cancel lands."""

    def __init__(self, downloads: Downloads, download_id: int) -> None:
        self.downloads = downloads
        self.id = download_id
        self.done = 0
        self.published = 0.0

    def begin(self, plan: Plan) -> None:
        self.downloads._check(self.id)

    def file(self, index: int, pulled: PullFile) -> None:
        self.downloads._check(self.id)
        self.downloads._update(self.id, file=pulled.path)

    def advance(self, n: int) -> None:
        self.downloads._check(self.id)  # raised inside huggingface_hub's loop: it removes the partial file
        self.done += n
        now = time.monotonic()
        publish = now - self.published >= PUBLISH_EVERY_S
        if publish:
            self.published = now
        self.downloads._update(self.id, done=max(0, self.done), publish=publish)

    def note(self, message: str) -> None:
        download = self.downloads.get(self.id)
        if download is not None:
            self.downloads._update(self.id, notes=(*download.notes, message))

    def end(self, completed: bool) -> None:
        if completed:
            self.downloads._update(self.id, done=self.done)


def downloads_of(app: App[Any]) -> Downloads:
    """The app's downloads (``app.downloads``), made and attached when the app has none yet."""
    found = getattr(app, "downloads", None)
    if not isinstance(found, Downloads):
        found = Downloads(app)
        app.downloads = found  # type: ignore[attr-defined]
    return found


def _sync_pi(store: Any) -> list[str]:
    """pi's models.json, as after ``athanor pull`` (cli/pull_cmd._sync_pi): its messages, or why it failed."""
    from athanor.errors import AthanorError
    from athanor.integrations import pi

    try:
        return list(pi.sync_if_enabled(store, store.models.load()))
    except (AthanorError, OSError) as exc:
        return [f"the store is saved, but pi's models.json is not: {exc}; 'athanor sync pi' retries"]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_LIVE: weakref.WeakSet[Downloads] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At exit (the TUI quit): cancel what is still downloading, so no half-written file outlives the process."""
    for downloads in list(_LIVE):
        downloads.close()
