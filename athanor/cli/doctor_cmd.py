"""doctor: what this machine has and lacks to serve models (the checks live in ``athanor/doctor.py``)."""

from __future__ import annotations

import json

import click

from athanor import doctor
from athanor.cli.common import store


@click.command("doctor")
@click.option("-o", "--output", type=click.Choice(["json"]), default=None, help="Output format (default: lines).")
@click.option("--check-updates", is_flag=True,
              help=f"Also compare athanor and the runtimes with PyPI (${doctor.PYPI_URL_ENV} overrides the index) "
                   "and, on macOS, Homebrew's llama.cpp.")
def doctor_cmd(output: str | None, check_updates: bool) -> int:
    """Check the platform, runtimes, HF cache, ports, service manager and gateway; print the fix for each failure.

    Exit 1 when a required check fails (one that keeps a registered model or the gateway from being served),
    0 otherwise. Updates never fail it.
    """
    base = doctor.pypi_url() if check_updates else None  # a bad ATHANOR_PYPI_URL is an error before any check
    ctx = doctor.Context.gather(store())
    checks = doctor.run_checks(ctx)
    updates = doctor.check_updates(ctx, base) if base else []
    if output == "json":
        document: dict[str, object] = {"ok": not doctor.failed(checks), "checks": [c.as_json() for c in checks]}
        if check_updates:
            document["updates"] = [c.as_json() for c in updates]
        click.echo(json.dumps(document, indent=2))
    else:
        for check in [*checks, *updates]:
            _echo(check)
    return 1 if doctor.failed(checks) else 0


def _echo(check: doctor.Check) -> None:
    color = "green" if check.ok else "red" if check.required else "yellow"
    mark, rest = check.line().split(" ", 1)
    click.echo(f"{click.style(mark, fg=color)} {rest}")
