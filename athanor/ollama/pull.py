"""``POST /api/pull``: ``athanor pull`` behind Ollama's pull API, its progress as Ollama's progress objects.

Names. Ollama pulls from its own library (``llama3``, ``qwen3:8b``); athanor pulls from Hugging Face only, so a
name must be a Hub repo: ``hf.co/ORG/REPO``, ``huggingface.co/ORG/REPO`` or ``ORG/REPO``, with an optional tag.
``:latest`` (or none) is the choice ``athanor pull`` makes; another tag names a GGUF quantization (``:Q4_K_M``,
any case), as Ollama reads the tags of ``hf.co`` names. Anything else is refused with the form to use.

The pull is the CLI's (athanor.cli.pull_cmd), one step after the other in a thread of its own, since
huggingface_hub blocks: ``plan`` (a quant tag becomes the ``--file`` the CLI would be given: the quant's file, every
shard, and the repo's projector), ``check_fit`` (a model that cannot fit is refused: Ollama has no ``--force``),
``check_disk``, ``download`` with a ``Progress``, the sha256 of each file fetched checked against the Hub's listing,
``register`` (the daemon's discovery), then pi's sync as after ``athanor pull``.

Answers, as Ollama's:

    {"status": "pulling manifest"}
    {"status": "pulling 3f1a2b4c5d6e", "digest": "sha256:3f1a...", "total": N, "completed": M}   per file, repeated
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}                                                          (registration)
    {"status": "success"}

A file the listing gives no sha256 (a small non-LFS file) is ``"pulling <file name>"`` without a digest. Progress is
sent at most every ``PROGRESS_EVERY_S`` per file, and always when a file completes. Errors are ``{"error": "..."}``:
with the status code while nothing was sent (the listing and the fit and disk checks come before the first line, so
an unknown repo is a 404 even when streaming), as the last line once the stream has started. ``stream: false``
answers ``{"status": "success"}`` alone. Status codes: 400 a bad body or name, and a model that cannot fit this
machine (a refusal of what was asked, like Ollama's 400s; there is no flag to force it here, the message names the
CLI's); 404 no such repo, or no such quantization in it; 507 not enough disk for the files (Insufficient Storage:
exactly that); 502 the Hub failed; 500 anything else.

One pull downloads at a time: huggingface_hub's log is redirected per download (pull.py's ``_hub_log``), a
process-wide setting two downloads at once would tangle; a second pull waits, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from athanor.errors import AthanorError, HubError, InvalidValueError, NotFoundError, PullRefused, printable

if TYPE_CHECKING:
    from athanor.hub.pull import Plan, PullFile
    from athanor.store import Store

log = logging.getLogger(__name__)

FORM = "hf.co/ORG/REPO[:QUANT]"
EXAMPLE = "hf.co/bartowski/Qwen_Qwen3-8B-GGUF:Q4_K_M"
HUB_HOSTS = frozenset({"hf.co", "huggingface.co", "www.huggingface.co"})
PROGRESS_EVERY_S = 0.1  # the most often one file's progress is sent
CLIENT_CHECK_S = 1.0  # how often a handler waiting for the pull looks whether its client is still there
NDJSON = {"Content-Type": "application/x-ndjson"}
_PART = re.compile(r"^[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20
_ONE_AT_A_TIME = threading.Lock()


# ---------------------------------------------------------------------------------------------- names


def hub_repo(name: str) -> tuple[str, str | None]:
    """An Ollama pull name as (Hub repo id, quantization tag or None for the default choice). A pasted
    ``https://huggingface.co/ORG/REPO`` is taken too."""
    text = name.strip()
    path, tag = re.sub(r"^https?://", "", text, flags=re.IGNORECASE), None
    head, _, last = path.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        path = f"{head}/{last}" if head else last
    parts = path.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):  # a registry host
        if parts[0].lower() not in HUB_HOSTS:
            raise InvalidValueError(f"{printable(parts[0])!r} is not Hugging Face: athanor pulls models from Hugging "
                                    f"Face only; name a Hub repo as {FORM} (e.g. {EXAMPLE})")
        parts = parts[1:]
    if len(parts) != 2 or not all(_PART.match(p) and p not in (".", "..") for p in parts):
        library = ", not from Ollama's library" if len(parts) == 1 else ""
        raise InvalidValueError(f"{printable(text)!r} is not a Hugging Face repo: athanor pulls models from Hugging "
                                f"Face{library}; name a Hub repo as {FORM} (e.g. {EXAMPLE})")
    if tag is not None and not _PART.match(tag):
        raise InvalidValueError(f"{printable(text)!r}: the tag after ':' must name a quantization such as Q4_K_M "
                                f"(or be 'latest'); the form is {FORM}")
    return "/".join(parts), None if tag is None or tag.lower() == "latest" else tag


def quant_files(repo: str, tag: str) -> tuple[str, ...]:
    """The files ``athanor pull REPO --file ...`` would be given for a quant tag: every file of the GGUF
    quantization the tag names (its shards), and the projector ``athanor pull`` would fetch beside it."""
    from athanor.discovery.gguf import quantization_from_filename
    from athanor.hub import _client, choose_gguf

    info = _client.model_info(repo)
    choice = choose_gguf((s.rfilename, s.size) for s in info.siblings or [])
    wanted = quantization_from_filename(tag) or tag.upper()
    match = next((c for c in choice.candidates if (c.quant or "").upper() == wanted), None)
    if match is None:
        if not choice.candidates:
            raise NotFoundError(f"{repo} has no GGUF weights, and a tag (:{tag}) picks a GGUF quantization: pull "
                                f"hf.co/{repo} without one")
        have = ", ".join(c.quant or c.files[0] for c in choice.candidates)
        raise NotFoundError(f"{repo} has no {tag} quantization; it has {have}")
    return (*match.files, *(choice.projector.files if choice.projector else ()))


# ---------------------------------------------------------------------------------------------- the pull


class ClientGone(Exception):
    """Raised inside the download (from its progress hook) once the client that asked for the pull went away."""


@dataclass(frozen=True)
class _Failed:
    status: int
    message: str


_PLANNED = object()  # the listing and the checks passed: the answer may start
_DONE = object()  # the success object was sent


@dataclass
class _Feed:
    """What the pull's thread hands the handler (thread-safely, onto the loop's queue), and where a client's
    departure lands for the thread to see."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    gone: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the daemon stopped and nobody reads any more
            self.gone.set()

    def status(self, text: str, **fields: Any) -> None:
        self.put({"status": text, **fields})

    def check(self) -> None:
        if self.gone.is_set():
            raise ClientGone


def _run(repo: str, tag: str | None, store: Store, feed: _Feed) -> None:
    try:
        _pull(repo, tag, store, feed)
    except ClientGone:
        log.info("pull of %s stopped: its client went away (nothing was registered)", repo)
    except Exception as exc:  # noqa: BLE001 - every failure reaches the client as Ollama's error
        feed.put(_failure(exc))


def _pull(repo: str, tag: str | None, store: Store, feed: _Feed) -> None:
    from athanor.hub import pull

    files = quant_files(repo, tag) if tag else ()
    plan = pull.plan(repo, files=files, cache_dir=pull.cache_dir(store.models.load()))
    notes = [note.text for note in pull.check_fit(plan) if note.warning]
    try:
        pull.check_disk(plan)
    except PullRefused as exc:
        raise _DiskRefused(str(exc)) from exc
    feed.put(_PLANNED)
    feed.status("pulling manifest")
    for note in notes:
        feed.status(note)
    with _turn(feed):
        paths = pull.download(plan, _OllamaProgress(feed))
    feed.status("verifying sha256 digest")
    _verify(plan, paths)
    feed.status("writing manifest")
    registration = pull.register(plan, store)
    for message in [*registration.warnings, *(note for r in registration.models for note in r.notes)]:
        feed.status(message)
    problems = [r.problem for r in registration.models if r.problem]
    if problems:
        raise AthanorError(problems[0])
    if not registration.models:
        raise AthanorError(f"{plan.repo}: none of the files pulled is a model on its own; nothing was registered")
    for registered in registration.models:
        feed.status(f"registered as {registered.name}")
    if any(r.action == "discovered" for r in registration.models):
        for message in _sync_pi(store):
            feed.status(message)
    feed.status("success")
    feed.put(_DONE)


class _DiskRefused(PullRefused):
    """check_disk's refusal: answered 507."""


@contextlib.contextmanager
def _turn(feed: _Feed) -> Iterator[None]:
    """Wait for any other pull's download to end (module docstring); a client that leaves meanwhile stops it."""
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        feed.status("waiting for another pull to finish")
        while not _ONE_AT_A_TIME.acquire(timeout=CLIENT_CHECK_S):
            feed.check()
    try:
        feed.check()
        yield
    finally:
        _ONE_AT_A_TIME.release()


class _OllamaProgress:
    """pull.download's ``Progress`` as Ollama's per-file objects; also where a client's departure stops the
    download: the next chunk written raises ``ClientGone`` inside huggingface_hub's loop, which removes the file it
    was writing (as after Ctrl-C of ``athanor pull``). Files already complete stay in the cache, and the next pull
    does not fetch them again. Stopping, rather than letting it finish, frees the network and the disk at once."""

    def __init__(self, feed: _Feed) -> None:
        self.feed = feed
        self.current: PullFile | None = None
        self.completed = 0
        self.sent_at = 0.0

    def begin(self, plan: Plan) -> None:
        self.feed.check()

    def file(self, index: int, pulled: PullFile) -> None:
        self.feed.check()
        self._flush()
        self.current, self.completed = pulled, pulled.size if pulled.cached else 0
        self._send()

    def advance(self, n: int) -> None:
        self.feed.check()
        self.completed = max(0, self.completed + n)  # negative: a resumed request started over
        if time.monotonic() - self.sent_at >= PROGRESS_EVERY_S:
            self._send()

    def note(self, message: str) -> None:
        self.feed.status(message)

    def end(self, completed: bool) -> None:
        if completed:
            self._flush()

    def _flush(self) -> None:
        """The file's last object: complete (its size, whatever was counted on the way)."""
        if self.current is not None:
            self.completed = self.current.size
            self._send()
        self.current = None

    def _send(self) -> None:
        pulled = self.current
        assert pulled is not None
        self.sent_at = time.monotonic()
        total = pulled.size
        if pulled.blob and _SHA256.match(pulled.blob):
            self.feed.status(f"pulling {pulled.blob[:12]}", digest=f"sha256:{pulled.blob}", total=total,
                             completed=min(self.completed, total))
        else:
            self.feed.status(f"pulling {pulled.path.rsplit('/', 1)[-1]}", total=total,
                             completed=min(self.completed, total))


def _verify(plan: Plan, paths: list[Path]) -> None:
    """Each file this pull fetched whose sha256 the Hub listed, hashed as Ollama checks its blobs (huggingface_hub
    does not). A file that does not match is removed from the cache, so discovery never registers it."""
    for pulled, path in zip(plan.files, paths, strict=True):
        if pulled.cached or not pulled.blob or not _SHA256.match(pulled.blob):
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != pulled.blob:
            blob = path.resolve()
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise HubError(f"{pulled.path} of {plan.repo} arrived with sha256 {digest.hexdigest()[:12]}, not the "
                           f"Hub's {pulled.blob[:12]}: it was removed from the cache; pull again")


def _sync_pi(store: Store) -> list[str]:
    """pi's models.json, as after ``athanor pull``: what it says, or why it failed (the pull itself succeeded)."""
    from athanor.integrations import pi

    try:
        return list(pi.sync_if_enabled(store, store.models.load()))
    except (AthanorError, OSError) as exc:
        return [f"the store is saved, but pi's models.json is not: {exc}; 'athanor sync pi' retries"]


def _failure(exc: BaseException) -> _Failed:
    """An exception as Ollama's error, with the status code the module docstring lists."""
    if isinstance(exc, InvalidValueError):
        return _Failed(400, str(exc))
    if isinstance(exc, NotFoundError):
        return _Failed(404, str(exc))
    if isinstance(exc, _DiskRefused):
        return _Failed(507, str(exc))
    if isinstance(exc, PullRefused):
        return _Failed(400, str(exc))
    if isinstance(exc, HubError):
        return _Failed(502, str(exc))
    if isinstance(exc, AthanorError | OSError):
        return _Failed(500, str(exc) or type(exc).__name__)
    log.error("pull failed unexpectedly", exc_info=exc)
    return _Failed(500, "internal error in the gateway's pull (see its log)")


# ---------------------------------------------------------------------------------------------- the handler


async def handle(request: web.Request, store: Store) -> web.StreamResponse:
    """Ollama's ``POST /api/pull`` (a PullRequest: ``model``, or ``name`` from older clients; ``stream``, default
    true; ``insecure`` is ignored: the Hub is reached over HTTPS, or at ``HF_ENDPOINT``)."""
    try:
        name, stream = await _read(request)
        repo, tag = hub_repo(name)
    except InvalidValueError as exc:
        return _error(400, str(exc))
    feed = _Feed(asyncio.get_running_loop())
    threading.Thread(target=_run, args=(repo, tag, store, feed), name=f"athanor-ollama-pull {repo}",
                     daemon=True).start()
    try:
        first = await _next(request, feed)
        if isinstance(first, _Failed):
            return _error(first.status, first.message)
        if not stream:
            while not isinstance(item := await _next(request, feed), _Failed) and item is not _DONE:
                pass
            return _error(item.status, item.message) if isinstance(item, _Failed) else \
                web.json_response({"status": "success"})
        return await _stream(request, feed)
    except ClientGone:
        return _error(499, "the client closed the connection")  # nobody reads it: aiohttp needs an answer
    finally:
        feed.gone.set()  # done, failed, or the client left: a download still running stops at its next chunk


async def _read(request: web.Request) -> tuple[str, bool]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidValueError("the body is not JSON: send a PullRequest, {\"model\": \"" + FORM + "\"}") from None
    if not isinstance(body, dict):
        raise InvalidValueError("the body must be a JSON object: {\"model\": \"" + FORM + "\"}")
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidValueError(f"'model' is required: the Hugging Face repo to pull, as {FORM}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidValueError("'stream' must be true or false")
    return name, stream is not False


async def _next(request: web.Request, feed: _Feed) -> Any:
    """The next thing the pull hands over; ``ClientGone`` once the client closed its connection (looked at every
    ``CLIENT_CHECK_S`` while the pull is silent: a listing, a download that stalls, ``stream: false``)."""
    while True:
        try:
            return await asyncio.wait_for(feed.queue.get(), CLIENT_CHECK_S)
        except TimeoutError:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ClientGone from None


async def _stream(request: web.Request, feed: _Feed) -> web.StreamResponse:
    response = web.StreamResponse(headers=NDJSON)
    await response.prepare(request)
    try:
        while (item := await _next(request, feed)) is not _DONE:
            await response.write(_line({"error": item.message} if isinstance(item, _Failed) else item))
            if isinstance(item, _Failed):
                break
        await response.write_eof()
    except (ConnectionError, ClientGone):
        pass  # the client left; the caller's finally stops the download
    return response


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


__all__ = ["FORM", "ClientGone", "handle", "hub_repo", "quant_files"]
