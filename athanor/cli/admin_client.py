"""The CLI's side of the admin API (``ingress/admin.py``): requests and Server-Sent Event streams over urllib, so
commands that talk to the daemon import no HTTP framework.

A stream is read with a timeout of several heartbeats (``athanor/heartbeat.py``): a quiet gateway sends a
heartbeat comment, which is skipped, so only a gateway that sends nothing at all for that long ends a stream."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from athanor import catalog, heartbeat
from athanor.auth import admin_key_for_cli
from athanor.errors import AthanorError, NotFoundError
from athanor.liveness import daemon_record
from athanor.store import Store

PREFIX = "/athanor/v1"


class AdminClient:
    def __init__(self, address: str, key: str | None):
        self.address = address
        self.key = key

    @classmethod
    def for_store(cls, store: Store) -> AdminClient:
        """The running gateway's admin API, or an error that says how to start one."""
        record = daemon_record(store)
        if not record:
            raise AthanorError("the gateway is not running; start it with 'athanor up' (or 'athanor serve')")
        if not record.get("admin"):  # never guess one: the admin key would go to whoever holds that address
            raise AthanorError(f"the gateway (pid {record['pid']}, http://{record['listen']}) has no loopback "
                               "listener for its admin API (its loopback address on that port is in use; it retries "
                               "every few seconds): the admin API is not reachable; see 'athanor get events'")
        auth = catalog.gateway_spec(store.models.load())["auth"]
        # A loopback address: without an admin key, the admin API answers nothing else.
        return cls(record["admin"], admin_key_for_cli(auth))

    def _open(self, method: str, path: str, timeout: float | None, accept: str | None = None) -> Any:
        url = f"http://{self.address}{path if path.startswith('/metrics') else PREFIX + path}"
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        if accept:
            request.add_header("Accept", accept)
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = str(exc)
            raise (NotFoundError if exc.code == 404 else AthanorError)(message) from exc
        except OSError as exc:
            raise AthanorError(f"cannot reach the gateway at {self.address}: {exc}") from exc

    def action(self, model: str, action: str, force: bool = False) -> dict[str, Any]:
        """``start``, ``stop``, ``restart`` or ``unload`` of ``model`` (a name, an alias or a Hugging Face id)."""
        return self.post(f"{model_path(model)}/{action}" + ("?force=1" if force else ""))

    def post(self, path: str, timeout: float = 600.0) -> dict[str, Any]:
        return self.request("POST", path, timeout)

    def request(self, method: str, path: str, timeout: float = 60.0) -> Any:
        """``method`` on ``path``, answered with JSON."""
        with self._open(method, path, timeout) as resp:
            return json.loads(resp.read())

    def get(self, path: str, timeout: float = 30.0) -> Any:
        with self._open("GET", path, timeout) as resp:
            body = resp.read()
            return json.loads(body) if resp.headers.get_content_type() == "application/json" else body

    def _stream(self, path: str) -> Iterator[tuple[str, str]]:
        """(event type, data) of each Server-Sent Event of ``path``, until the caller stops. Comments (heartbeats)
        are skipped; a gateway that sends not even those for ``heartbeat.read_timeout()`` seconds ends it with an
        error, and so does a stream the gateway closes (a stream of the admin API ends only when the gateway
        stops)."""
        timeout = heartbeat.read_timeout()
        with self._open("GET", path, timeout, accept="text/event-stream") as resp:
            if resp.headers.get_content_type() != "text/event-stream":  # a gateway from before streams were SSE
                raise AthanorError(f"the gateway at {self.address} is older than this athanor (it answered "
                                   f"{resp.headers.get_content_type()}, not an event stream); restart it")
            kind, data = "message", []
            try:
                for raw in resp:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if not line:
                        if data:
                            yield kind, "\n".join(data)
                        kind, data = "message", []
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
            except TimeoutError as exc:
                raise AthanorError(f"the gateway at {self.address} sent nothing for {timeout:.0f} s, not even a "
                                   f"heartbeat; giving the stream up") from exc
            except (OSError, http.client.HTTPException) as exc:
                raise AthanorError(f"lost the stream from the gateway at {self.address}: {exc}") from exc
        raise AthanorError(f"the gateway at {self.address} closed the stream (is it stopping?)")

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Events from ``since`` on, then each new one as it happens (an SSE stream), until the caller stops."""
        path = "/events?follow=1" + (f"&since={since}" if since is not None else "")
        for kind, data in self._stream(path):
            payload = json.loads(data)
            if kind == "lagged":
                raise AthanorError(f"the event stream was cut off: {payload.get('message')}")
            yield payload

    def log(self, model: str, lines: int) -> Iterator[str]:
        """The last ``lines`` lines of a model's runtime log, then its text as it is written (across restarts, with
        a line where a new runtime starts), until the caller stops."""
        path = f"{model_path(model)}/logs?follow=1&lines={lines}"
        for _, data in self._stream(path):
            yield json.loads(data)["text"]

    def daemon_log(self, lines: int) -> Iterator[str]:
        """The daemon's own log as ``log`` follows a model's."""
        for _, data in self._stream(f"/daemon/logs?follow=1&lines={lines}"):
            yield json.loads(data)["text"]

    def statuses(self) -> Iterator[dict[str, Any]]:
        """The status now, then again after each change (coalesced by the gateway), until the caller stops."""
        for kind, data in self._stream("/status?follow=1"):
            if kind == "status":
                yield json.loads(data)


def model_path(model: str) -> str:
    """The admin API's path of a model: a Hugging Face id's "/" percent-encoded, so it stays one path segment."""
    return f"/models/{urllib.parse.quote(model, safe='')}"
