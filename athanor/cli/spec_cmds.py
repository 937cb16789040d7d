"""apply, diff, delete: the declarative verbs."""

from __future__ import annotations

import click

from athanor import actions
from athanor.cli.common import echo_changes, filename_option, store, warn
from athanor.errors import AthanorError


@click.command("apply")
@filename_option
@click.option("--dry-run", is_flag=True, help="Validate and show what would change; write nothing.")
@click.option("--prune", is_flag=True, help="Remove applied models and recipes that PATH no longer names.")
def apply_cmd(filenames: tuple[str, ...], dry_run: bool, prune: bool) -> None:
    """Apply every document in PATH, all or nothing.

    Any invalid document stops the whole apply before anything is written. Models found in the HF cache are
    (re)discovered first; a Model whose source matches a discovered one adopts it, keeping its port.
    """
    result = actions.apply(store(), filenames, dry_run=dry_run, prune=prune, stdin=click.get_text_stream("stdin"))
    for message in result.warnings:
        warn(message)
    echo_changes(result.discovered, dry_run=dry_run)
    echo_changes(result.changes, dry_run=dry_run)
    for change in result.files:
        click.echo(f"{change}{' (dry run)' if dry_run else ''}")
    if not dry_run:
        from athanor.cli.sync_cmds import sync_clients

        sync_clients(result.after)


@click.command("diff")
@filename_option
@click.option("--prune", is_flag=True, help="Also show models that apply --prune would remove.")
def diff_cmd(filenames: tuple[str, ...], prune: bool) -> int:
    """Show a unified diff of what apply would change. Exit 0: no changes; 1: changes; 2: error."""
    try:
        text = actions.diff(store(), filenames, prune=prune, stdin=click.get_text_stream("stdin"))
    except AthanorError as exc:
        exc.exit_code = 2
        raise
    if text:
        click.echo(text, nl=False)
    return 1 if text else 0


@click.command("delete")
@click.option("-f", "--filename", "filenames", multiple=True, metavar="PATH", help="Delete what these specs name.")
@click.argument("kind", required=False, type=click.Choice(["model", "models", "recipe", "recipes"]))
@click.argument("names", nargs=-1)
def delete_cmd(filenames: tuple[str, ...], kind: str | None, names: tuple[str, ...]) -> None:
    """Delete models (or recipes) by name, or everything the -f specs name.

    Files on disk are never touched. A deleted discovered model is not rediscovered by later scans until a
    spec names its source again.
    """
    from athanor.cli.sync_cmds import sync_clients

    st = store()
    if filenames:
        if kind or names:
            raise click.UsageError("give either -f PATH or KIND NAME..., not both")
        echo_changes(actions.delete_files(st, filenames, stdin=click.get_text_stream("stdin")))
        sync_clients(st.models.load())
        return
    if not kind or not names:
        raise click.UsageError("nothing to delete: give -f PATH, or 'model NAME...'")
    deleted = False
    try:
        for name in names:
            if kind.startswith("model"):
                echo_changes([actions.delete_model(st, name)])
            else:
                echo_changes(actions.delete_recipe(st, name))
            deleted = True
    finally:
        if deleted:  # each name is its own transaction: those before a failing one are gone, and pi follows
            sync_clients(st.models.load())
