"""The CLI's side of the admin API (``ingress/admin.py``): requests and Server-Sent Event streams over urllib, so
commands that talk to the daemon import no HTTP framework."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from athanor import catalog
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
        auth = catalog.gateway_spec(store.models.load())["auth"]
        # A loopback address: without an admin key, the admin API answers nothing else.
        return cls(record.get("admin") or record["listen"], admin_key_for_cli(auth))

    def _open(self, method: str, path: str, timeout: float | None) -> Any:
        url = f"http://{self.address}{path if path.startswith('/metrics') else PREFIX + path}"
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
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

    def post(self, path: str, timeout: float = 600.0) -> dict[str, Any]:
        with self._open("POST", path, timeout) as resp:
            return json.loads(resp.read())

    def get(self, path: str, timeout: float = 30.0) -> Any:
        with self._open("GET", path, timeout) as resp:
            body = resp.read()
            return json.loads(body) if resp.headers.get_content_type() == "application/json" else body

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Events from ``since`` on, then each new one as it happens (an SSE stream), until the caller stops."""
        path = "/events?follow=1" + (f"&since={since}" if since is not None else "")
        with self._open("GET", path, None) as resp:
            data: list[str] = []
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    payload = json.loads("\n".join(data))
                    data = []
                    if "seq" not in payload:  # event: lagged
                        raise AthanorError(f"the event stream was cut off: {payload.get('message')}")
                    yield payload
