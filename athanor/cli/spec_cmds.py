"""apply, diff, delete: the declarative verbs."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import click

from athanor import actions
from athanor.cli.common import echo_changes, filename_option, store, warn
from athanor.errors import AthanorError

if TYPE_CHECKING:
    from athanor.weights import Plan


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
@click.option("--files", "remove_files", is_flag=True,
              help="Also remove the models' weights from disk (asks first; shared files are kept).")
@click.option("-y", "--yes", is_flag=True, help="With --files: remove without asking (needed without a terminal).")
@click.argument("kind", required=False, type=click.Choice(["model", "models", "recipe", "recipes"]))
@click.argument("names", nargs=-1)
def delete_cmd(filenames: tuple[str, ...], remove_files: bool, yes: bool, kind: str | None,
               names: tuple[str, ...]) -> None:
    """Delete models (or recipes) by name, or everything the -f specs name.

    Files on disk are kept, and a deleted discovered model is not rediscovered by later scans until a spec names
    its source again. --files removes the weights too, asking first on a terminal (elsewhere it needs --yes): the
    model's Hugging Face cache revision (blobs other revisions share stay), or the GGUF file (all shards, and its
    mmproj) or MLX directory of a path source. Anything another registered model uses is kept; weights
    downloaded again later are discovered again.
    """
    from athanor.cli.sync_cmds import sync_clients

    st = store()
    if filenames and (kind or names):
        raise click.UsageError("give either -f PATH or KIND NAME..., not both")
    if not filenames and (not kind or not names):
        raise click.UsageError("nothing to delete: give -f PATH, or 'model NAME...'")
    if remove_files and kind and not kind.startswith("model"):
        raise click.UsageError("--files removes models' weights; recipes have no files")
    stdin = click.get_text_stream("stdin")
    spec_text = stdin.read() if "-" in filenames else None  # read once: the plan and the delete both parse it

    def specs() -> Any:
        return io.StringIO(spec_text) if spec_text is not None else stdin

    planned = None
    if remove_files:
        from athanor import weights

        targets = weights.models_named_by(st, filenames, specs()) if filenames else list(names)
        planned = weights.plan(st, targets)
        _confirm_removal(planned, yes, interactive=stdin.isatty() and spec_text is None)
    deleted = False
    try:
        if filenames:
            echo_changes(actions.delete_files(st, filenames, stdin=specs()))
            deleted = True
        else:
            for name in (planned.models if planned else names):
                if kind.startswith("model"):
                    echo_changes([actions.delete_model(st, name)])
                else:
                    echo_changes(actions.delete_recipe(st, name))
                deleted = True
    finally:
        if deleted:  # each name is its own transaction: those before a failing one are gone, and pi follows
            sync_clients(st.models.load())
    if planned is not None:
        from athanor import weights

        outcome = weights.execute(st, planned)
        for line in outcome.lines():
            click.echo(line)
        error = outcome.error()
        if error:
            raise error


def _confirm_removal(planned: Plan, yes: bool, *, interactive: bool) -> None:
    """Show what --files removes and get a yes: --yes, or an answer on the terminal. Nothing is deleted
    (not even the registry entries) unless this returns."""
    if yes or not planned.removals:
        return  # what was removed and kept is printed afterwards
    from athanor.views import human_bytes

    models = ", ".join(f"model/{n}" for n in planned.models)
    total = human_bytes(planned.size_bytes) if planned.size_bytes else "0B"
    click.echo(f"Deleting {models} removes from disk:")
    for line in planned.lines():
        click.echo(line)
    if not interactive:
        raise AthanorError(f"not removing {total} of files without confirmation: stdin is not a terminal; "
                           "pass --yes to remove them (nothing was deleted)")
    if not click.confirm(f"Delete {models} and remove these files ({total})?", default=False):
        raise AthanorError("nothing was deleted")
