"""scan, preset, flavor, recipes: imperative changes to models that rescans and applies respect."""

from __future__ import annotations

import click

from athanor import actions, catalog, registry, views
from athanor.cli.common import echo_changes, emit, output_option, store, warn
from athanor.cli.get_cmds import _complete_model, _get_recipes
from athanor.cli.sync_cmds import sync_clients
from athanor.runtimes.resolve import effective_for


@click.command("scan")
@click.option("--path", "paths", multiple=True, metavar="DIR", help="Also search DIR for loose models (repeatable).")
@click.option("--prune", is_flag=True, help="Forget discovered models whose files are gone.")
def scan_cmd(paths: tuple[str, ...], prune: bool) -> None:
    """Discover models in the Hugging Face cache and the gateway's discovery paths.

    New models are registered with a name and a port; known ones only get their detected facts refreshed
    (path, size, metadata). Presets, ports, aliases, recipes and flavors are never changed by a scan.
    """
    result = registry.scan(store(), paths, prune=prune)
    for message in result.warnings:
        warn(message)
    echo_changes(result.changes)
    click.echo(scan_summary(result), err=True)
    sync_clients(store().models.load())


def scan_summary(result: registry.ScanResult) -> str:
    """``scan: 2 added, 1 updated, 5 unchanged`` (plus missing and pruned when there are any): what this scan did,
    not how many models exist, so a rescan that changed nothing says so."""
    parts = [f"{result.count('discovered')} added", f"{result.count('refreshed')} updated",
             f"{result.unchanged} unchanged"]
    parts += [f"{result.count(action)} {action}" for action in ("missing", "pruned") if result.count(action)]
    return "scan: " + ", ".join(parts)


@click.group("preset", invoke_without_command=False)
def preset_cmd() -> None:
    """Show or change a model's own preset (the top layer over its recipe and the runtime's defaults)."""


@preset_cmd.command("show")
@click.argument("name", shell_complete=_complete_model)
@output_option
def preset_show(name: str, output: str | None) -> None:
    """The effective preset of NAME and where each value comes from."""
    doc = store().models.load()
    obj = doc["models"][catalog.resolve_name(doc, name)]
    effective = effective_for(doc, obj)
    if output in ("json", "yaml"):
        emit({k: {"value": v.value, "from": v.source} for k, v in effective.items()}, output)
        return
    rows = [[k, str(v.value).lower() if isinstance(v.value, bool) else str(v.value), v.source]
            for k, v in effective.items()]
    click.echo(views.render_table(["KEY", "VALUE", "FROM"], rows))


@preset_cmd.command("set")
@click.argument("name", shell_complete=_complete_model)
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
def preset_set(name: str, assignments: tuple[str, ...]) -> None:
    """Set preset keys on NAME, e.g. 'athanor preset set qwen ctxSize=16384 flashAttn=on'."""
    preset = actions.set_preset(store(), name, assignments)
    click.echo(f"model/{name} preset: " + ", ".join(f"{k}={v}" for k, v in preset.items()))
    sync_clients(store().models.load())  # ctxSize and maxTokens are pi's contextWindow and maxTokens


@preset_cmd.command("unset")
@click.argument("name", shell_complete=_complete_model)
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
def preset_unset(name: str, keys: tuple[str, ...]) -> None:
    """Remove preset keys from NAME (the recipe's or default value applies again)."""
    preset = actions.unset_preset(store(), name, keys)
    click.echo(f"model/{name} preset: " + (", ".join(f"{k}={v}" for k, v in preset.items()) or "<empty>"))
    sync_clients(store().models.load())


@click.command("flavor")
@click.argument("name", shell_complete=_complete_model)
@click.argument("flavor", type=click.Choice(["lm", "vlm"]))
def flavor_cmd(name: str, flavor: str) -> None:
    """Serve the MLX model NAME with mlx_lm.server (lm, text only) or mlx_vlm.server (vlm, images too)."""
    echo_changes([actions.set_flavor(store(), name, flavor)])
    sync_clients(store().models.load())  # vlm takes images


@click.command("recipes")
@click.argument("name", required=False)
@output_option
def recipes_cmd(name: str | None, output: str | None) -> None:
    """List recipes (built-in and user-defined Recipe objects), or show one."""
    _get_recipes(store().models.load(), name, output)
