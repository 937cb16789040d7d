"""What every command shares: the store, output formats, and printing changes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import click

from athanor.catalog import Change
from athanor.store import Store, open_store

OUTPUT_FORMATS = ("wide", "json", "yaml", "name")

output_option = click.option(
    "-o", "--output", type=click.Choice(OUTPUT_FORMATS), default=None, help="Output format (default: a table)."
)
filename_option = click.option(
    "-f", "--filename", "filenames", multiple=True, required=True, metavar="PATH",
    help="A spec file, a directory (searched recursively for *.yaml/*.yml), or - for stdin. Repeatable.",
)


def store() -> Store:
    return open_store()


def emit(data: Any, fmt: str) -> None:
    """Machine-readable output: JSON with stable key order as stored, or YAML."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def echo_changes(changes: Iterable[Change], *, dry_run: bool = False, quiet_unchanged: bool = False) -> None:
    suffix = " (dry run)" if dry_run else ""
    colors = {"created": "green", "configured": "yellow", "adopted": "cyan", "discovered": "cyan",
              "refreshed": "yellow", "deleted": "red", "pruned": "red", "missing": "red"}
    for change in changes:
        if quiet_unchanged and change.action == "unchanged":
            continue
        click.secho(f"{change}{suffix}", fg=colors.get(change.action))


def warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)
