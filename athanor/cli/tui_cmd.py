"""``athanor tui`` (and ``athanor`` alone on a terminal): the live window onto the gateway (``athanor/tui``)."""

from __future__ import annotations

import sys

import click


@click.command("tui")
def tui_cmd() -> None:
    """Open the terminal UI: models, phases, logs and events, live. Quitting (q) leaves every model running."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.ClickException("the TUI needs a terminal (stdin and stdout); try 'athanor get models'")
    from athanor.tui import run

    run()
