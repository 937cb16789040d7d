"""``athanor park ls|clear``: the conversations parked on disk (KV parking, ``athanor/parking``).

Read and removed from ``$ATHANOR_HOME/park`` directly, with or without a gateway: a running one finds a cleared
slot gone at its next start and prefills anew. Only counts and sizes are shown; the files hold conversations.
"""

from __future__ import annotations

import time

import click

from athanor.cli.common import store
from athanor.errors import NotFoundError
from athanor.parking import files


def _model(name: str | None) -> str | None:
    if name is None:
        return None
    from athanor import catalog

    try:
        return catalog.resolve_name(store().models.load(), name)
    except NotFoundError:
        return name  # a deleted model's leftovers can still be listed and cleared


@click.group("park")
def park_cmd() -> None:
    """Parked KV caches: a llama-server's slots saved before it stopped, restored when it starts again.

    Bounded by the Gateway's parking.budget (least recently used go first); off with parking.enabled: false."""


@park_cmd.command("ls")
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Choice(["json"]), default=None, help="Output format (default: a table).")
def ls_cmd(model: str | None, output: str | None) -> None:
    """List parked slots, most recently used first (all models, or MODEL's)."""
    parked = files.listing(store().home, _model(model))
    if output == "json":
        from athanor.cli.common import emit

        emit([p.to_dict() for p in parked], "json")
        return
    from athanor.views import human_bytes, human_duration, render_table

    now = time.time()
    rows = [[p.model, p.key, "cache" if p.slot == files.NO_SLOT else str(p.slot), f"{p.tokens:,}" if p.tokens else "-",
             human_bytes(p.size), human_duration(int(now - p.parked_at)), human_duration(int(now - p.used_at))]
            for p in parked]
    click.echo(render_table(["MODEL", "KEY", "SLOT", "TOKENS", "SIZE", "PARKED", "USED"], rows)
               if rows else "nothing parked")


@park_cmd.command("clear")
@click.argument("model", required=False)
def clear_cmd(model: str | None) -> None:
    """Remove what is parked (every model's, or MODEL's)."""
    freed = files.clear(store().home, _model(model))
    from athanor.views import human_bytes

    click.echo(f"cleared {human_bytes(freed) if freed else 'nothing'}" + (f" parked for {model}" if model else ""))

