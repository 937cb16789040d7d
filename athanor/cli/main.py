"""The ``athanor`` command: a lazy click group, so ``athanor get`` never imports aiohttp, jinja2 or textual.

Errors: every AthanorError becomes its message on stderr (one line per problem) and its exit code; anything
unexpected becomes one line naming the bug, with the traceback only under ATHANOR_DEBUG=1.
"""

from __future__ import annotations

import importlib
import os
import sys
import click

from athanor import __version__

# command name -> "module:attribute", imported only when the command runs (or its --help is asked for).
COMMANDS: dict[str, tuple[str, str]] = {
    "apply": ("athanor.cli.spec_cmds:apply_cmd", "Apply desired state from files, a directory or stdin."),
    "diff": ("athanor.cli.spec_cmds:diff_cmd", "Show what apply would change (exit 0 none, 1 changes)."),
    "delete": ("athanor.cli.spec_cmds:delete_cmd", "Delete what files name, or one model by name."),
    "render": ("athanor.cli.render_cmd:render_cmd", "Render the desired state as Kubernetes manifests."),
    "get": ("athanor.cli.get_cmds:get_cmd", "List models, the gateway or recipes."),
    "describe": ("athanor.cli.get_cmds:describe_cmd", "Show one model in detail: preset, argv, status, events."),
    "scan": ("athanor.cli.model_cmds:scan_cmd", "Discover models in the HF cache and model directories."),
    "preset": ("athanor.cli.model_cmds:preset_cmd", "Show or change a model's preset."),
    "flavor": ("athanor.cli.model_cmds:flavor_cmd", "Serve an MLX model as text (lm) or vision (vlm)."),
    "recipes": ("athanor.cli.model_cmds:recipes_cmd", "List built-in and user recipes."),
    "serve": ("athanor.cli.serve_cmds:serve_cmd", "Run the gateway in the foreground."),
    "up": ("athanor.cli.serve_cmds:up_cmd", "Start the gateway in the background."),
    "down": ("athanor.cli.serve_cmds:down_cmd", "Stop the gateway and every runtime it started."),
    "install": ("athanor.cli.install_cmds:install_cmd", "Run the gateway under launchd or systemd, from login."),
    "uninstall": ("athanor.cli.install_cmds:uninstall_cmd", "Remove every job or unit athanor created."),
    "start": ("athanor.cli.serve_cmds:start_cmd", "Start a model's runtime in the running gateway."),
    "stop": ("athanor.cli.serve_cmds:stop_cmd", "Stop a model's runtime."),
    "restart": ("athanor.cli.serve_cmds:restart_cmd", "Restart a model's runtime."),
    "unload": ("athanor.cli.serve_cmds:unload_cmd", "Unload a model (it loads again on the next request)."),
    "logs": ("athanor.cli.serve_cmds:logs_cmd", "Show a model's runtime log."),
    "wait": ("athanor.cli.serve_cmds:wait_cmd", "Wait for a model condition, e.g. --for=condition=Ready."),
    "doctor": ("athanor.cli.doctor_cmd:doctor_cmd", "Check runtimes, cache, ports, service manager and gateway."),
    "top": ("athanor.cli.top_cmd:top_cmd", "Show requests, tokens, latency and phases live."),
    "telemetry": ("athanor.cli.telemetry_cmds:telemetry_cmd", "List, compare or clear per-request records."),
    "park": ("athanor.cli.park_cmds:park_cmd", "List or clear parked KV caches (swap-back without re-prefill)."),
    "tui": ("athanor.cli.tui_cmd:tui_cmd", "Open the terminal UI (also 'athanor' alone on a terminal)."),
    "sync": ("athanor.cli.sync_cmds:sync_cmd", "Keep agent clients (pi) in step with the served models."),
    "snippet": ("athanor.cli.sync_cmds:snippet_cmd", "Print curl, Python and pi examples for a model."),
    "fit": ("athanor.cli.fit_cmd:fit_cmd", "Estimate a model's memory and how well it fits this machine."),
    "pull": ("athanor.cli.pull_cmd:pull_cmd", "Download a Hub repo into the HF cache and register it as a model."),
    "search": ("athanor.cli.hub_cmds:search_cmd", "Search the Hugging Face Hub for models, with their fit here."),
    "trending": ("athanor.cli.hub_cmds:trending_cmd", "The Hub's trending models, with their fit here."),
    "completion": ("athanor.cli.main:completion_cmd", "Print a shell completion script."),
    "version": ("athanor.cli.main:version_cmd", "Print the version."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="athanor")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """athanor: one OpenAI-compatible port in front of your local models.

    Desired state lives in YAML specs (apiVersion athanor.dev/v1alpha1) applied like Kubernetes objects.
    Files live in $ATHANOR_HOME (default ~/.athanor).
    """
    if "NO_COLOR" in os.environ:
        ctx.color = False


@click.command("version")
def version_cmd() -> None:
    """Print athanor's version."""
    click.echo(f"athanor {__version__}")


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_cmd(shell: str) -> None:
    """Print the completion script for SHELL, e.g. eval "$(athanor completion bash)"."""
    from click.shell_completion import get_completion_class

    comp_cls = get_completion_class(shell)
    assert comp_cls is not None
    comp = comp_cls(cli, {}, "athanor", "_ATHANOR_COMPLETE")
    click.echo(comp.source())


def main(argv: list[str] | None = None) -> None:
    from athanor.errors import AthanorError

    args = sys.argv[1:] if argv is None else argv
    if not args and _on_terminal():  # `athanor` alone on a terminal opens the TUI; elsewhere it prints help
        args = ["tui"]
    try:
        code = cli.main(args=args, prog_name="athanor", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("athanor: aborted", err=True)
        sys.exit(130)
    except AthanorError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            click.echo(f"athanor: {line}" if not _located(line) else line, err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if os.environ.get("ATHANOR_DEBUG"):
            raise
        click.echo(f"athanor: internal error: {type(exc).__name__}: {exc} (ATHANOR_DEBUG=1 shows the traceback)", err=True)
        sys.exit(70)
    sys.exit(code if isinstance(code, int) else 0)


def _on_terminal() -> bool:
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _located(line: str) -> bool:
    """Spec issues already start with file:line:col and are printed as they are."""
    head = line.split(": ", 1)[0]
    return head.count(":") >= 2 and head.rsplit(":", 2)[-1].isdigit()
