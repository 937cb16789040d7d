"""get and describe: reading desired and observed state."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import click

from athanor import catalog, views
from athanor.cli.common import emit, output_option, store
from athanor.errors import AthanorError, InvalidValueError, NotFoundError
from athanor.liveness import daemon_record
from athanor.managers import Managers, jobs
from athanor.runtimes import resolve

RESOURCE_TYPES = {
    "models": "model", "model": "model", "mo": "model",
    "gateway": "gateway", "gateways": "gateway", "gw": "gateway",
    "recipes": "recipe", "recipe": "recipe",
    "events": "event", "event": "event", "ev": "event",
}


def _complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    try:
        doc = store().models.load()
    except Exception:  # noqa: BLE001 - completion must never fail loudly
        return []
    return sorted(n for n in doc["models"] if n.startswith(incomplete))


def parse_selector(text: str | None) -> list[tuple[str, str, str | None]]:
    """``a=b,c!=d,e`` -> [(a, '=', b), (c, '!=', d), (e, 'exists', None)]."""
    if not text:
        return []
    terms = []
    for raw in text.split(","):
        term = raw.strip()
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in term:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif term:
            terms.append((term, "exists", None))
        if not terms or not terms[-1][0]:
            raise InvalidValueError(f"bad label selector {text!r}: expected key=value, key!=value or key")
    return terms


def matches(labels: dict[str, str], selector: list[tuple[str, str, str | None]]) -> bool:
    for key, op, value in selector:
        if op == "exists" and key not in labels:
            return False
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
    return True


@click.command("get")
@click.argument("resource", type=click.Choice(sorted(RESOURCE_TYPES)), metavar="RESOURCE")
@click.argument("name", required=False, shell_complete=_complete_model)
@output_option
@click.option("-l", "--selector", help="Label selector: key=value, key!=value or key, comma-separated.")
@click.option("-w", "--watch", is_flag=True,
              help="After the list, print a line for every change until Ctrl-C (models, events; needs the gateway).")
def get_cmd(resource: str, name: str | None, output: str | None, selector: str | None, watch: bool) -> None:
    """List RESOURCE (models, gateway, recipes, events), or show the one called NAME."""
    kind = RESOURCE_TYPES[resource]
    st = store()
    doc = st.models.load()
    if watch and kind not in ("model", "event"):
        raise InvalidValueError(f"--watch works with models and events, not {resource}")
    if kind == "event":
        _get_events(st, doc, name, output, watch)
        return
    if kind == "gateway":
        _get_gateway(doc, output, daemon_record(st))
        return
    if kind == "recipe":
        _get_recipes(doc, name, output)
        return
    instances = st.state.load()["instances"]
    terms = parse_selector(selector)
    names = [catalog.resolve_name(doc, name)] if name else sorted(doc["models"])
    gateway_up = daemon_record(st) is not None
    since = _last_event(st) if watch else None  # asked first: a change after it is streamed, not lost
    items = [
        views.model_view(doc["models"][n], instances.get(n), gateway_up)
        for n in names
        if matches(doc["models"][n]["metadata"].get("labels", {}), terms)
    ]
    if output in ("json", "yaml"):
        emit(items[0] if name else {"apiVersion": "v1", "kind": "List", "items": items}, output)
    elif output == "name":
        for item in items:
            click.echo(f"model/{item['metadata']['name']}")
    elif not items and (name or terms):
        click.echo("No models found.", err=True)
    elif not items:
        import psutil

        from athanor.hub.starters import empty_state

        click.echo(empty_state(psutil.virtual_memory().total), err=True)
    else:
        click.echo(_models_table(items, wide=output == "wide"))
    if watch:
        _watch_models(st, {item["metadata"]["name"] for item in items} if (name or terms) else None, output, since)


def _follow(st: Any, since: int | None = None) -> Any:
    """The gateway's events from ``since`` on, as they happen (Ctrl-C ends it quietly)."""
    from athanor.cli.admin_client import AdminClient

    client = AdminClient.for_store(st)
    try:
        yield from client.events(since)
    except KeyboardInterrupt:
        return


def _last_event(st: Any) -> int | None:
    from athanor.cli.admin_client import AdminClient

    return AdminClient.for_store(st).get("/status")["lastEvent"]


def _watch_models(st: Any, only: set[str] | None, output: str | None, since: int | None) -> None:
    """A line per phase change, kubectl get -w style: the model's row as it is now."""
    for event in _follow(st, since):
        if event.get("kind") != "Model" or "phase" not in event or (only is not None and event["name"] not in only):
            continue
        obj = st.models.load()["models"].get(event["name"])
        if obj is None:
            continue
        item = views.model_view(obj, {"phase": event["phase"], "message": event["message"],
                                      "phaseSince": event["time"], "generation": obj["metadata"].get("generation")})
        if output in ("json", "yaml"):
            click.echo(json.dumps({"type": "MODIFIED", "object": item}))
        else:
            click.echo(_models_table([item], wide=output == "wide").splitlines()[1])


def _event_row(event: dict[str, Any]) -> list[str]:
    obj = f"{event.get('kind', '?').lower()}/{event.get('name', '?')}"
    return [views.age(event.get("time")), event.get("type", ""), event.get("reason", ""), obj,
            event.get("message", "")]


EVENT_HEADER = ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]


def _get_events(st: Any, doc: dict[str, Any], name: str | None, output: str | None, watch: bool) -> None:
    """What happened, oldest first: what the gateway recorded (starts, swaps, evictions, failures) and what
    apply and scan changed. NAME narrows it to one model."""
    model = catalog.resolve_name(doc, name) if name else None
    events = [e for e in st.state.load()["events"] if model is None or e.get("name") == model]
    if output in ("json", "yaml"):
        if not watch:
            emit({"apiVersion": "v1", "kind": "List", "items": events}, output)
            return
        for event in events:
            click.echo(json.dumps(event))
    elif output == "name":
        for event in events:
            click.echo(f"event/{event.get('seq', event.get('time'))}")
    elif events:
        click.echo(views.render_table(EVENT_HEADER, [_event_row(e) for e in events]))
    elif not watch:
        click.echo("No events.", err=True)
    if not watch:
        return
    if not events:
        click.echo(views.render_table(EVENT_HEADER, []))
    seqs = [e["seq"] for e in events if isinstance(e.get("seq"), int)]
    for event in _follow(st, max(seqs) if seqs else None):
        if model is not None and event.get("name") != model:
            continue
        if output in ("json", "yaml"):
            click.echo(json.dumps(event))
        else:
            click.echo("   ".join(_event_row(event)))


def _models_table(items: list[dict[str, Any]], wide: bool) -> str:
    header = ["NAME", "RUNTIME", "STATUS", "PORT", "SIZE", "AGE"]
    if wide:
        header += ["PID", "UPTIME", "RSS", "PARAMS", "QUANT", "CTX", "RECIPE", "ALIASES", "SOURCE"]
    rows = []
    for item in items:
        status = item["status"]
        artifact = status.get("artifact", {})
        meta = artifact.get("metadata", {})
        row = [
            item["metadata"]["name"],
            item["spec"]["runtime"],
            views.display_status(item),
            str(status.get("port") or "-"),
            views.human_bytes(artifact.get("sizeBytes")),
            views.age(item["metadata"].get("creationTimestamp")),
        ]
        if wide:
            row += [
                str(status.get("pid") or "-"),
                views.human_duration(status.get("uptimeSeconds")),
                views.human_bytes(status.get("rssBytes")),
                views.human_count(meta.get("parameters")),
                str(meta.get("quantization") or "-"),
                str(meta.get("contextLength") or "-"),
                item["spec"].get("recipe", "balanced"),
                ",".join(item["spec"].get("aliases", [])) or "-",
                views.source_text(item["spec"]["source"]),
            ]
        rows.append(row)
    return views.render_table(header, rows)


def _get_gateway(doc: dict[str, Any], output: str | None, daemon: dict[str, Any] | None) -> None:
    """The Gateway's spec, and (``daemon``: its record, while it runs) the addresses it holds now."""
    gw = doc.get("gateway")
    spec = catalog.gateway_spec(doc)
    obj: dict[str, Any] = {
        "apiVersion": "athanor.dev/v1alpha1",
        "kind": "Gateway",
        "metadata": gw["metadata"] if gw else {"name": "default"},
        "spec": spec,
    }
    obj["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "annotations"}
    if daemon is not None:
        obj["status"] = {"pid": daemon["pid"], "listen": daemon["listen"], "ollama": daemon.get("ollama")}
    if output in ("json", "yaml"):
        emit(obj, output)
    elif output == "name":
        click.echo(f"gateway/{obj['metadata']['name']}")
    else:
        residency = spec["residency"]
        policy = residency["policy"] + (f" ({residency['budget']})" if residency.get("budget") else "")
        ports = spec["portRange"]
        ollama = (spec.get("ollama") or {}).get("listen")
        if ollama and daemon is not None and daemon.get("ollama") != ollama:
            ollama += " (not bound now: see athanor get events)"
        header = ["NAME", "LISTEN", "OLLAMA", "MANAGER", "RESIDENCY", "IDLE", "PORTS", "APPLIED"]
        row = [obj["metadata"]["name"], spec["listen"], ollama or "-", spec["serviceManager"], policy,
               spec["idleTimeout"], f"{ports['start']}-{ports['end']}", "yes" if gw else "no (defaults)"]
        click.echo(views.render_table(header, [row]))


def _get_recipes(doc: dict[str, Any], name: str | None, output: str | None) -> None:
    recipes = resolve.recipes(doc)
    if name:
        if name not in recipes:
            raise NotFoundError(f"recipe {name!r} not found (known: {', '.join(sorted(recipes))})")
        recipes = {name: recipes[name]}
    data = [
        {"name": r.name, "builtin": r.builtin, "description": r.description,
         "values": {k: dict(v) for k, v in r.values.items()}}
        for r in recipes.values()
    ]
    if output in ("json", "yaml"):
        emit(data[0] if name else data, output)
    elif output == "name":
        for r in data:
            click.echo(f"recipe/{r['name']}")
    else:
        rows = [[r["name"], "built-in" if r["builtin"] else "user", ",".join(r["values"]), r["description"]]
                for r in data]
        click.echo(views.render_table(["NAME", "TYPE", "RUNTIMES", "DESCRIPTION"], rows))


@click.command("describe")
@click.argument("resource", type=click.Choice(["model", "models", "mo"]), metavar="model")
@click.argument("name", shell_complete=_complete_model)
def describe_cmd(resource: str, name: str) -> None:
    """Show a model: spec, effective preset and where each value comes from, launch command, status, events."""
    st = store()
    doc = st.models.load()
    state = st.state.load()
    model_name = catalog.resolve_name(doc, name)
    obj = doc["models"][model_name]
    view = views.model_view(obj, state["instances"].get(model_name), daemon_record(st) is not None)
    spec, meta, status = view["spec"], view["metadata"], view["status"]
    out: list[str] = []

    def field(label: str, value: Any, indent: int = 0) -> None:
        out.append(f"{' ' * indent}{label + ':':<{16 - indent}}{value}")

    field("Name", meta["name"])
    field("Labels", ",".join(f"{k}={v}" for k, v in meta.get("labels", {}).items()) or "<none>")
    field("Annotations", ",".join(f"{k}={v}" for k, v in meta.get("annotations", {}).items()) or "<none>")
    field("Created", f"{meta.get('creationTimestamp')} ({views.age(meta.get('creationTimestamp'))} ago)")
    field("Generation", meta.get("generation", 1))
    field("Runtime", spec["runtime"])
    field("Source", views.source_text(spec["source"]))
    field("Aliases", ", ".join(spec.get("aliases", [])) or "<none>")
    field("Residency", spec.get("residency", "onDemand"))
    gateway = catalog.gateway_spec(doc)
    for label, key in (("Startup limit", "startupTimeout"), ("Idle unload", "idleTimeout")):
        field(label, spec[key] if key in spec else f"{gateway[key]} (gateway)")
    field("Port", spec.get("port"))
    artifact = status.get("artifact")
    out.append("Artifact:")
    if artifact:
        field("Path", artifact["path"], 2)
        field("Format", f"{artifact['format']}, {views.human_bytes(artifact['sizeBytes'])}", 2)
        facts = artifact.get("metadata", {})
        field("Metadata", " ".join(f"{k}={v}" for k, v in facts.items()) or "<unreadable>", 2)
        field("Capabilities", ", ".join(artifact.get("capabilities", [])), 2)
        if artifact.get("mmproj"):
            field("Projector", artifact["mmproj"], 2)
    else:
        out.append("  <not found on disk>")
    recipe = spec.get("recipe", "balanced")
    recipes = resolve.recipes(doc)
    out.append(f"Preset (recipe {recipe}{'' if recipe in recipes else ', MISSING'}):")
    effective = resolve.effective_for(doc, obj)
    rows = [[k, _show(v.value), v.source] for k, v in effective.items()]
    out += ["  " + line for line in views.render_table(["KEY", "VALUE", "FROM"], rows).splitlines()]
    out.append("Launch:")
    launch = resolve.launch_for(doc, obj, st.home)
    if launch:
        field("Command", shlex.join(launch.argv), 2)
        out.append("  Argv, where each part comes from:")
        out += ["    " + line for line in views.render_table(["ARGUMENTS", "FROM"], _argv_rows(launch)).splitlines()]
        field("Environment", " ".join(f"{k}={v}" for k, v in launch.env.items()) or "<none>", 2)
        field("Serves as", launch.served_model, 2)
    else:
        out.append("  <cannot start: weights not found>")
    from athanor.managers.files import manager_for

    managers = Managers(st.home)
    manager = manager_for(st, doc)  # under auto, the one the running (or installed) gateway uses
    field("Manager", manager.name, 2)
    files = manager.files(jobs.model_job(model_name, launch, st.home)) if launch else {}
    field("Service file", ", ".join(str(p) for p in files) or "<none: the embedded supervisor runs it>", 2)
    field("Log", st.logs_dir / f"{model_name}.log", 2)
    out += _parking_lines(doc, obj, launch, st.home, model_name)
    out.append("Status:")
    field("Phase", status["phase"], 2)
    handle = state["instances"].get(model_name, {}).get("handle")
    if handle:
        field("Job", _job_view(managers, handle, gateway), 2)
    for key in ("pid", "startedAt"):
        if key in status:
            field(key[0].upper() + key[1:], status[key], 2)
    if "uptimeSeconds" in status:
        field("Uptime", views.human_duration(status["uptimeSeconds"]), 2)
        field("Memory (RSS)", views.human_bytes(status["rssBytes"]), 2)
    if "lastFailure" in status:
        failure = status["lastFailure"]
        field("Last failure", f"{failure.get('reason')} at {failure.get('time')}: {failure.get('message')}"
              f" (exit code {failure.get('exitCode')})", 2)
        tail = failure.get("logTail") or []
        if tail:
            out.append("  Log tail:")
            out += [f"    {line}" for line in tail[-10:]]
    out.append("Conditions:")
    cond_rows = [[c["type"], c["status"], c["reason"], c.get("message", "")] for c in status["conditions"]]
    out += ["  " + line for line in views.render_table(["TYPE", "STATUS", "REASON", "MESSAGE"], cond_rows).splitlines()]
    events = [e for e in state["events"] if e.get("kind") == "Model" and e.get("name") == model_name][-10:]
    out.append("Events:")
    if events:
        ev_rows = [[views.age(e["time"]), e["type"], e["reason"], e["message"]] for e in events]
        out += ["  " + line for line in views.render_table(["AGE", "TYPE", "REASON", "MESSAGE"], ev_rows).splitlines()]
    else:
        out.append("  <none>")
    click.echo("\n".join(out))


def _parking_lines(doc: dict[str, Any], obj: dict[str, Any], launch: Any, home: Any, name: str) -> list[str]:
    """Whether this model's conversations survive its stops (KV parking), and what is parked now."""
    from athanor.parking import files as park_files

    if launch is None:
        return []
    if not launch.park_dir:
        return ["Parking:", f"  Off: {resolve.parking_refusal(doc, obj, launch) or 'not for this runtime'}"]
    key = Path(launch.park_dir).name
    parked = [p for p in park_files.listing(home, name) if p.key == key]
    lines = ["Parking:", f"  {'Directory:':<14}{launch.park_dir}"]
    if not parked:
        return [*lines, f"  {'Parked:':<14}nothing yet (saved when a drained runtime stops)"]
    return [*lines, *(f"  {'Parked:':<14}{_parked_text(p)}, {views.human_bytes(p.size)}, parked "
                      f"{views.human_duration(int(time.time() - p.parked_at))} ago" for p in parked)]


def _parked_text(parked: Any) -> str:
    from athanor.parking import files as park_files

    return "prefix cache" if parked.slot == park_files.NO_SLOT else f"slot {parked.slot}, {parked.tokens:,} tokens"


def _argv_rows(launch: Any) -> list[list[str]]:
    """Consecutive arguments with one origin on one row: ``--ctx-size 4096`` <- ``preset ctxSize (model)``."""
    rows: list[list[str]] = []
    for arg, origin in zip(launch.argv, launch.origins or ("",) * len(launch.argv), strict=True):
        if rows and rows[-1][1] == origin:
            rows[-1][0] += " " + shlex.quote(arg)
        else:
            rows.append([shlex.quote(arg), origin])
    return rows


def _job_view(managers: Any, handle: dict[str, Any], gateway: dict[str, Any]) -> str:
    """The job as its manager sees it now (launchctl print, systemctl show, or the process itself)."""
    import asyncio

    try:
        manager = managers.of(handle, gateway)
        seen = asyncio.run(manager.observe(handle))
    except (ValueError, TypeError, AthanorError) as exc:
        return f"<cannot ask its manager: {exc}>"
    words = [f"{manager.name}: {'running' if seen.running else 'not running'}"]
    if seen.pid:
        words.append(f"pid {seen.pid}")
    if seen.restarts:
        words.append(f"{seen.restarts} restarts by the manager")
    if seen.exit_code is not None:
        words.append(f"last exit code {seen.exit_code}")
    return ", ".join(words) + (f" ({seen.detail})" if seen.detail else "")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
