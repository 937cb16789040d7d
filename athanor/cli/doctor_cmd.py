"""doctor: what this machine has and lacks to serve models (the checks live in ``athanor/doctor/``)."""

from __future__ import annotations

import json

import click

from athanor.cli.common import store
from athanor.doctor import Check, Context, failed, run_checks
from athanor.doctor.updates import PYPI_URL_ENV, check_updates, pypi_url


@click.command("doctor")
@click.option("-o", "--output", type=click.Choice(["json"]), default=None, help="Output format (default: lines).")
@click.option("--check-updates", "with_updates", is_flag=True,
              help=f"Also compare athanor and the runtimes with PyPI (${PYPI_URL_ENV} overrides the index) "
                   "and, on macOS, Homebrew's llama.cpp.")
def doctor_cmd(output: str | None, with_updates: bool) -> int:
    """Check the platform, runtimes, HF cache, ports, service manager and gateway; print the fix for each failure.

    Exit 1 when a required check fails (one that keeps a registered model or the gateway from being served),
    0 otherwise. Updates never fail it.
    """
    base = pypi_url() if with_updates else None  # a bad ATHANOR_PYPI_URL is an error before any check
    ctx = Context.gather(store())
    checks = run_checks(ctx)
    updates = check_updates(ctx, base) if base else []
    if output == "json":
        document: dict[str, object] = {"ok": not failed(checks), "checks": [c.as_json() for c in checks]}
        if with_updates:
            document["updates"] = [c.as_json() for c in updates]
        click.echo(json.dumps(document, indent=2))
    else:
        for check in [*checks, *updates]:
            _echo(check)
    return 1 if failed(checks) else 0


def _echo(check: Check) -> None:
    color = "green" if check.ok else "red" if check.required else "yellow"
    mark, rest = check.line().split(" ", 1)
    click.echo(f"{click.style(mark, fg=color)} {rest}")
