"""``athanor telemetry ls|compare|clear``: the per-request records the gateway keeps across restarts.

With a gateway running, through its admin API (``/athanor/v1/telemetry``: it writes its pending records first, so
the answer includes requests of the last second). With none, from ``$ATHANOR_HOME/telemetry.db`` directly
(SQLite lets a reader in beside a writer, and a file a killed daemon left is replayed on open): telemetry stays
useful with the daemon down. Either way the answers are the same JSON (``telemetry/db.py``).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import click

from athanor.cli.common import store
from athanor.errors import NotFoundError
from athanor.store import Store
from athanor.telemetry import db

json_option = click.option("-o", "--output", type=click.Choice(["json"]), default=None,
                           help="Output format (default: a table).")


class _Source:
    """Where the records are read: the running gateway, or the file."""

    def __init__(self, st: Store):
        from athanor.liveness import daemon_record

        self.store = st
        self.client = None
        record = daemon_record(st)
        if record and record.get("admin"):
            from athanor.cli.admin_client import AdminClient

            self.client = AdminClient.for_store(st)

    def _api(self, method: str, path: str) -> Any:
        assert self.client is not None
        try:
            return self.client.request(method, path)
        except NotFoundError:
            self.client = None  # a gateway from before telemetry: read the file
            return None

    def _local(self, query: Any, *args: Any) -> Any:
        conn = db.connect(db.path_in(self.store.home), create=False)
        try:
            return query(conn, *args)
        finally:
            if conn is not None:
                conn.close()

    def _resolve(self, name: str) -> str:
        from athanor import catalog

        try:
            return catalog.resolve_name(self.store.models.load(), name)
        except NotFoundError:
            return name  # a deleted model keeps its records

    def records(self, model: str | None, since: str | None, limit: int) -> list[dict[str, Any]]:
        if self.client is not None:
            query = {"limit": limit, **({"model": model} if model else {}), **({"since": since} if since else {})}
            answer = self._api("GET", "/telemetry?" + urllib.parse.urlencode(query))
            if answer is not None:
                return answer["items"]
        return self._local(db.records, self._resolve(model) if model else None,
                           db.parse_since(since) if since else None, limit)

    def compare(self, models: tuple[str, ...], last: int) -> list[dict[str, Any]]:
        if self.client is not None:
            query = urllib.parse.urlencode([("model", m) for m in models] + [("last", last)])
            answer = self._api("GET", "/telemetry/compare?" + query)
            if answer is not None:
                return answer["models"]
        return self._local(db.compare, [self._resolve(m) for m in models], last)

    def clear(self) -> int:
        if self.client is not None:
            answer = self._api("DELETE", "/telemetry")
            if answer is not None:
                return answer["deleted"]
        return self._local(db.clear)


@click.group("telemetry")
def telemetry_cmd() -> None:
    """Per-request records (tokens, TTFT, tokens/s) kept across gateway restarts.

    Kept in $ATHANOR_HOME/telemetry.db, bounded by the Gateway's telemetry.retention (maxRecords, maxAge)."""


@telemetry_cmd.command("ls")
@click.argument("model", required=False)
@click.option("--limit", default=db.DEFAULT_LIMIT, show_default=True, type=click.IntRange(1, 100_000),
              help="At most this many records, the newest.")
@click.option("--since", default=None, metavar="SPAN|TIME", help="Only records since 30m, 2h, 7d ago, or a UTC time.")
@json_option
def ls_cmd(model: str | None, limit: int, since: str | None, output: str | None) -> None:
    """List requests, newest first (all models, or MODEL's)."""
    items = _Source(store()).records(model, since, limit)
    if output == "json":
        from athanor.cli.common import emit

        emit({"apiVersion": "v1", "items": items}, "json")
        return
    from athanor.views import render_table

    header = ["TIME", "MODEL", "RUNTIME", "ROUTE", "STATUS", "PROMPT", "COMPLETION", "CACHED", "TTFT", "TOTAL",
              "DECODE TOK/S", "PREFILL TOK/S"]
    rows = [[r["time"], r["model"], r["runtime"], r["route"], str(r["status"]), _n(r["promptTokens"]),
             _n(r["completionTokens"]), _n(r["cachedTokens"]), _ms(r["ttftSeconds"]), _ms(r["totalSeconds"]),
             _rate(r["decodeTokensPerSecond"]), _rate(r["prefillTokensPerSecond"])] for r in items]
    click.echo(render_table(header, rows) if rows else "no requests recorded")


@telemetry_cmd.command("compare")
@click.argument("models", nargs=-1, required=True)
@click.option("--last", default=db.DEFAULT_LAST, show_default=True, type=click.IntRange(1, 100_000),
              help="Each model over its last N requests.")
@json_option
def compare_cmd(models: tuple[str, ...], last: int, output: str | None) -> None:
    """Models side by side over their last N requests: requests, errors, p50/p95 TTFT, decode and prefill
    tokens/s (medians of the per-request figures), tokens."""
    figures = _Source(store()).compare(models, last)
    if output == "json":
        from athanor.cli.common import emit

        emit({"apiVersion": "v1", "models": figures}, "json")
        return
    from athanor.views import render_table

    lines = [("REQUESTS", "requests", _n), ("ERRORS", "errors", _n), ("CLIENT GONE", "clientGone", _n),
             ("TTFT P50", "ttftP50", _ms), ("TTFT P95", "ttftP95", _ms),
             ("DECODE TOK/S", "decodeTokensPerSecond", _rate), ("PREFILL TOK/S", "prefillTokensPerSecond", _rate),
             ("PROMPT TOKENS", "promptTokens", _n), ("COMPLETION TOKENS", "completionTokens", _n)]
    rows = [[label, *(show(f[key]) for f in figures)] for label, key, show in lines]
    click.echo(render_table(["", *(f["model"] for f in figures)], rows))


@telemetry_cmd.command("clear")
def clear_cmd() -> None:
    """Delete every record."""
    click.echo(f"deleted {_Source(store()).clear()} records")


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
