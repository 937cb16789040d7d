"""sync and snippet: agent clients and code that call the gateway."""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

import click

from athanor.cli.common import store, warn
from athanor.cli.get_cmds import _complete_model

if TYPE_CHECKING:
    from athanor.integrations import KeySource


@click.group("sync")
def sync_cmd() -> None:
    """Keep agent clients in step with the models the gateway serves."""


@sync_cmd.command("pi")
@click.option("--dir", "directory", metavar="DIR",
              help="pi's agent directory (default: the Gateway's integrations.pi.dir, else $PI_CODING_AGENT_DIR, "
                   "else $PI_HOME/agent, else ~/.pi/agent).")
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
def sync_pi(directory: str | None, dry_run: bool) -> None:
    """Write the 'athanor' provider, one model per served model, into pi's models.json.

    Models are listed by the names clients send. Only providers.athanor is rewritten; every other provider and
    setting in the file is kept. The gateway's key is never written: pi reads it from auth.apiKeyEnv's variable,
    or from auth.apiKeyFile through a command. Then: pi --provider athanor --model NAME. With the Gateway's
    integrations.pi.sync set, apply, scan, delete, preset, flavor and the daemon's cache watcher do this.
    """
    from athanor.integrations import pi

    result = pi.sync(store(), directory=directory, dry_run=dry_run)
    for line in result.lines():
        click.echo(line)
    click.echo(result.summary())


@click.command("snippet")
@click.argument("model", shell_complete=_complete_model)
def snippet_cmd(model: str) -> None:
    """Print a curl command, Python (openai SDK) code and a pi command line that call MODEL through the gateway.

    With the Gateway's auth set, they read the key from its environment variable or file; none prints it.
    """
    from athanor import catalog
    from athanor.integrations import gateway_url, key_source

    doc = store().models.load()
    name = catalog.resolve_name(doc, model)
    if doc["models"][name]["spec"].get("residency") == "disabled":
        warn(f"{name} is disabled: the gateway does not serve it until its residency changes")
    click.echo(render_snippets(name, gateway_url(doc) + "/v1", key_source(doc)))


def render_snippets(name: str, base_url: str, key: KeySource | None) -> str:
    """The three snippets for model ``name``; ``key`` None: the gateway asks for no key."""
    messages = [{"role": "user", "content": "Hello!"}]
    body = json.dumps({"model": name, "messages": messages})
    curl = [f"curl -s {shlex.quote(base_url + '/chat/completions')} \\",
            "  -H 'Content-Type: application/json' \\"]
    if key is not None:
        curl.append(f"  -H \"Authorization: Bearer {key.shell()}\" \\")
    curl.append(f"  -d {shlex.quote(body)}")

    python = ["from openai import OpenAI", ""]
    if key is None:
        api_key = '"unused"'
    elif key.env:
        python.insert(0, "import os")
        api_key = f"os.environ[{json.dumps(key.env)}]"
    else:
        python.insert(0, "from pathlib import Path")
        python += [f"lines = Path({json.dumps(key.file)}).read_text().splitlines()",
                   'api_key = next(s for s in map(str.strip, lines) if s and not s.startswith("#"))', ""]
        api_key = "api_key"
    python += [f"client = OpenAI(base_url={json.dumps(base_url)}, api_key={api_key})",
               f"reply = client.chat.completions.create(model={json.dumps(name)}, messages={json.dumps(messages)})",
               "print(reply.choices[0].message.content)"]

    where = ""
    if key is not None:
        where = f"; pi reads the key from ${key.env}" if key.env else f"; pi reads the key from {key.file}"
    pi = [f"# pi ('athanor sync pi' adds the athanor provider to pi's models.json{where})",
          f"pi --provider athanor --model {shlex.quote(name)}"]
    return "\n".join(["# curl", *curl, "", "# Python (pip install openai)", *python, "", *pi])


def sync_clients(doc: dict[str, Any]) -> None:
    """After apply, scan, delete, preset and flavor: sync pi when the Gateway in ``doc`` asks for it. The store is
    saved by then, so a failure here is a warning, never a failed command."""
    from athanor.errors import AthanorError
    from athanor.integrations import pi

    try:
        messages = pi.sync_if_enabled(store(), doc)
    except (AthanorError, OSError) as exc:
        warn(f"the store is saved, but pi's models.json is not: {exc}; 'athanor sync pi' retries")
        return
    for message in messages:
        click.echo(message)
