"""The TUI's side of the admin API (``ingress/admin.py``), over aiohttp inside the app's event loop.

The TUI is a client like the CLI: it finds the daemon through the record the daemon keeps in state.json (the same
``daemon_record`` the CLI reads), presents the CLI's admin key, and never touches a process itself. Every call is
bounded by a timeout, so a slow or stuck daemon delays a refresh, never the keyboard; any failure is an
``AdminUnavailable`` the screens show as a banner or a notice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

PREFIX = "/athanor/v1"
CALL_TIMEOUT_S = 5.0  # one GET: a daemon slower than this is shown as not answering, and tried again
ACTION_TIMEOUT_S = 600.0  # a start waits for the model to load


class AdminUnavailable(Exception):
    """The admin API did not answer, or answered with an error (the message says which, in one line)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where the running daemon's admin API is, from its record."""

    admin: str  # host:port of the loopback admin listener
    listen: str  # the ingress address clients use
    pid: int
    key: str | None


def locate(home: Path | None) -> Target | str:
    """The running daemon's admin API, or a one-line reason why there is none (run in a thread: it reads files and
    asks psutil)."""
    from athanor import catalog
    from athanor.auth import admin_key_for_cli
    from athanor.liveness import daemon_record
    from athanor.store import open_store

    try:
        store = open_store(home)
        record = daemon_record(store)
        if not record:
            return "the gateway is not running"
        if not record.get("admin"):
            return f"the gateway (pid {record['pid']}) has no loopback admin listener yet"
        key = admin_key_for_cli(catalog.gateway_spec(store.models.load())["auth"])
    except Exception as exc:  # noqa: BLE001 - a broken store is shown, the TUI keeps trying
        return f"cannot read the gateway's record: {exc}"
    return Target(record["admin"], record.get("listen", record["admin"]), int(record["pid"]), key)


class AdminSession:
    """Calls to one daemon's admin API. Made inside the app's loop; ``close`` it when the app ends."""

    def __init__(self, target: Target) -> None:
        import aiohttp

        self.target = target
        headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
        self._http: aiohttp.ClientSession = aiohttp.ClientSession(headers=headers)

    def _url(self, path: str) -> str:
        return f"http://{self.target.admin}{PREFIX}{path}"

    async def close(self) -> None:
        await self._http.close()

    async def get(self, path: str, timeout: float = CALL_TIMEOUT_S) -> Any:
        """The JSON (or text) at ``path``; ``AdminUnavailable`` on any failure, with ``status`` 404 for an endpoint
        or model this daemon does not have."""
        import aiohttp

        try:
            async with self._http.get(self._url(path), timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return await _answer(resp)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdminUnavailable(f"GET {path}: {_reason(exc)}") from exc

    async def post(self, path: str, timeout: float = ACTION_TIMEOUT_S) -> Any:
        return await self._send("POST", path, timeout)

    async def delete(self, path: str, timeout: float = CALL_TIMEOUT_S) -> Any:
        return await self._send("DELETE", path, timeout)

    async def _send(self, method: str, path: str, timeout: float) -> Any:
        import aiohttp

        try:
            async with self._http.request(method, self._url(path),
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return await _answer(resp)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdminUnavailable(f"{method} {path}: {_reason(exc)}") from exc

    async def stream(self, path: str, read_timeout: float) -> AsyncIterator[tuple[str, Any]]:
        """(event type, decoded data) of each Server-Sent Event at ``path`` until the daemon closes it; heartbeat
        comments are skipped, and ``read_timeout`` seconds of nothing at all (not even a heartbeat) end it."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CALL_TIMEOUT_S, sock_read=read_timeout)
        try:
            async with self._http.get(self._url(path), timeout=timeout,
                                      headers={"Accept": "text/event-stream"}) as resp:
                if resp.status != 200:
                    await _answer(resp)
                kind, data = "message", []
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if not line:
                        if data:
                            yield kind, _decoded("\n".join(data))
                        kind, data = "message", []
                    elif line.startswith(":"):
                        continue
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdminUnavailable(f"stream {path}: {_reason(exc)}") from exc
        raise AdminUnavailable(f"stream {path}: the gateway closed it")


def model_path(name: str) -> str:
    """A model's path in the admin API: a Hugging Face id's "/" percent-encoded, so it stays one path segment."""
    from urllib.parse import quote

    return f"/models/{quote(name, safe='')}"


async def _answer(resp: aiohttp.ClientResponse) -> Any:
    body = await resp.read()
    if resp.status >= 400:
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body.decode("utf-8", "replace")[:200] or resp.reason
        raise AdminUnavailable(str(message), resp.status)
    if resp.content_type == "application/json":
        return json.loads(body)
    return body.decode("utf-8", "replace")


def _decoded(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
