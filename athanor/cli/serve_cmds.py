"""serve, up, down, start, stop, restart, logs, wait: running the gateway and its models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from athanor import catalog, registry, views
from athanor.cli.common import store, warn
from athanor.cli.get_cmds import _complete_model
from athanor.errors import AthanorError, InvalidValueError, NotFoundError
from athanor.liveness import daemon_record
from athanor.paths import ensure_private_dir, open_private_file
from athanor.store import Store


@click.command("serve")
@click.option("--listen", metavar="HOST:PORT", help="Override the Gateway's spec.listen.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def serve_cmd(listen: str | None, verbose: bool) -> None:
    """Run the gateway in the foreground: ingress and controller. Ctrl-C stops it and its runtimes."""
    import asyncio
    import logging

    from athanor.daemon import serve
    from athanor.store.daemon_lock import hold_daemon_lock

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    st = store()
    # One daemon per home, decided before anything is scanned, re-attached or written; held until this process ends.
    hold_daemon_lock(st, listen or catalog.gateway_spec(st.models.load())["listen"])  # its descriptor stays open
    result = registry.scan(st)
    for message in result.warnings:
        warn(message)
    try:
        import uvloop  # a faster event loop for the proxy's hot path, where available
    except ImportError:
        asyncio.run(serve(st, listen))
    else:
        uvloop.run(serve(st, listen))


@click.command("up")
@click.option("--listen", metavar="HOST:PORT", help="Override the Gateway's spec.listen.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the gateway to listen.")
def up_cmd(listen: str | None, timeout: float) -> None:
    """Start the gateway in the background (logs in $ATHANOR_HOME/logs/daemon.log)."""
    from athanor.addresses import loopback_for, parse_listen, wait_for_port
    from athanor.managers import installed_gateway

    st = store()
    running = daemon_record(st)
    if running:
        click.echo(f"athanor already up on http://{running['listen']} (pid {running['pid']})")
        return
    gateway = catalog.gateway_spec(st.models.load())
    address = listen or gateway["listen"]
    installed = installed_gateway(st.home, gateway)
    if installed and not listen:  # installed with launchd or systemd: start it there, where it is kept running
        import asyncio

        manager, job = installed
        asyncio.run(manager.start_job(job))
        host, port = parse_listen(address)
        if not wait_for_port(loopback_for(host) or host, port, timeout):
            raise AthanorError(f"the gateway did not start listening on {address}; see {job.log_path}")
        click.echo(f"athanor up on http://{address} ({manager.name})")
        return
    ensure_private_dir(st.logs_dir)
    argv = [sys.executable, "-m", "athanor", "serve"] + (["--listen", listen] if listen else [])
    log_path = st.logs_dir / "daemon.log"
    with open(open_private_file(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log_file:
        said_before = os.fstat(log_file.fileno()).st_size
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    record = _wait_recorded(st, proc, timeout)
    if record is not None:
        click.echo(f"athanor up on http://{record['listen']} (pid {proc.pid})")
        return
    if proc.poll() is None:
        raise AthanorError(f"the gateway did not start listening on {address} in {timeout:g} s; see {log_path}")
    running = daemon_record(st)
    if running:  # another `up` or `serve` won the home's lock meanwhile
        click.echo(f"athanor already up on http://{running['listen']} (pid {running['pid']})")
        return
    raise AthanorError(f"the gateway exited at start ({_last_line(log_path, said_before) or 'no message'}); "
                       f"see {log_path}")


def _wait_recorded(st: Store, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    """The record of the daemon ``proc`` once it serves (it writes it after its sockets accept), or None when it
    exits first or the timeout passes. A port that answers proves nothing: another process may hold it."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline and proc.poll() is None:
        record = daemon_record(st)
        if record and record["pid"] == proc.pid:
            return record
        time.sleep(delay)  # polling a start-up
        delay = min(delay * 1.5, 0.25)
    return None


def _last_line(path: Path, offset: int) -> str:
    """The last line written to ``path`` after ``offset`` (the error a daemon that exited at start printed)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").strip().splitlines()
    return lines[-1].removeprefix("athanor: ") if lines else ""


@click.command("down")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for a clean stop.")
def down_cmd(timeout: float) -> None:
    """Stop the background gateway and every runtime it started."""
    import asyncio

    import psutil

    from athanor.managers import installed_gateway

    st = store()
    said = False
    installed = installed_gateway(st.home, catalog.gateway_spec(st.models.load()))
    if installed:  # its manager would start it again: stop the job itself (whether or not it has a record yet)
        manager, job = installed
        if asyncio.run(manager.job_state(job)).pid:
            asyncio.run(manager.stop_job(job))
            click.echo(f"gateway stopped ({manager.name}; 'athanor up' starts it again)")
            said = True
    record = daemon_record(st)  # (still) running: started by hand
    if record:
        proc = psutil.Process(record["pid"])
        proc.send_signal(signal.SIGTERM)
        if not _wait_exit(proc, timeout):
            proc.kill()
            warn(f"the gateway did not stop in {timeout:.0f} s and was killed")
        click.echo(f"gateway (pid {record['pid']}) stopped")
        said = True
    # Runtimes a dead gateway left behind (kill -9) are still recorded: stop them the way the gateway would.
    if any(i.get("handle") for i in st.state.load()["instances"].values()):
        from athanor.controller.controller import stop_left_behind

        for name, pid in asyncio.run(stop_left_behind(st)).items():
            click.echo(f"model/{name} stopped (pid {pid})")
            said = True
    if not said:
        click.echo("athanor is down")


def _wait_exit(proc: Any, timeout: float) -> bool:
    """Wait for a process that is not our child: gone, or a zombie its parent has yet to reap, both count."""
    import psutil

    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(delay)  # polling a foreign process's exit
        delay = min(delay * 1.5, 0.2)
    return False


def _lifecycle(action: str):  # noqa: ANN202 - a small factory for identical commands
    @click.command(action)
    @click.argument("name", shell_complete=_complete_model)
    def command(name: str, force: bool = False) -> None:
        from athanor.cli.admin_client import AdminClient

        result = AdminClient.for_store(store()).action(name, action, force)  # quoted: an alias may hold "/"
        click.echo(f"model/{result['name']} {result['phase'].lower()}")

    command.help = f"{action.capitalize()} the runtime of model NAME in the running gateway."
    return command


start_cmd = click.option("--force", is_flag=True, help="Start it even if it may not fit in memory.")(
    _lifecycle("start"))
stop_cmd = _lifecycle("stop")
restart_cmd = _lifecycle("restart")
unload_cmd = _lifecycle("unload")
unload_cmd.help = "Unload model NAME (stop it after its requests finish); the next request loads it again."


@click.command("logs")
@click.argument("name", shell_complete=_complete_model)
@click.option("-n", "--lines", default=50, show_default=True, help="Lines to show from the end.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
def logs_cmd(name: str, lines: int, follow: bool) -> None:
    """Show the runtime log of model NAME.

    ``-f`` follows through the running gateway's admin API (the stream the TUI reads: heartbeats while the log is
    quiet, a line where a new runtime starts); with no gateway running, it follows the file itself."""
    from athanor.managers import logs
    from athanor.managers.log_reader import POLL_S, LogReader

    st = store()
    model = catalog.resolve_name(st.models.load(), name)
    path = st.logs_dir / f"{model}.log"
    if not path.exists() and daemon_record(st) is not None:  # a runtime in a cluster logs to its pod, not here
        from athanor.cli.admin_client import AdminClient, model_path

        text = AdminClient.for_store(st).get(f"{model_path(model)}/logs?lines={lines}")
        click.echo(text.decode("utf-8", "replace") if isinstance(text, bytes) else text, nl=False)
        return
    if not path.exists():
        raise NotFoundError(f"no log yet for {model} ({path}); it has not been started")
    if follow and daemon_record(st) is not None:
        from athanor.cli.admin_client import AdminClient

        for text in AdminClient.for_store(st).log(model, lines):
            click.echo(text, nl=False)
        return
    if not follow:
        for line in logs.tail(path, lines):
            click.echo(line)
        return
    reader = LogReader(path)
    for line in reader.start(lines):
        click.echo(line)
    while True:
        text = reader.read()
        if text:
            click.echo(text, nl=False)
        else:
            time.sleep(POLL_S)  # follow-mode polling interval


@click.command("wait")
@click.argument("resource", type=click.Choice(["model"]), metavar="model")
@click.argument("name", shell_complete=_complete_model)
@click.option("--for", "condition", default="condition=Ready", show_default=True,
              help="condition=TYPE[=True|False] (Available, Ready, Progressing, Failed), or phase=PHASE.")
@click.option("--timeout", default="60s", show_default=True, help="Give up after this long (e.g. 30s, 5m).")
def wait_cmd(resource: str, name: str, condition: str, timeout: str) -> None:
    """Wait until model NAME meets a condition (exit 1 on timeout)."""
    from athanor.quantities import parse_duration

    what, _, rest = condition.partition("=")
    value, _, wanted = rest.partition("=")
    wanted = wanted or "True"
    if what not in ("condition", "phase") or not value or (what == "phase" and wanted != "True"):
        raise InvalidValueError(f"--for {condition!r}: expected condition=TYPE[=True|False] or phase=PHASE")
    if what == "condition" and value not in CONDITIONS:
        raise InvalidValueError(f"--for {condition!r}: unknown condition {value!r} (known: {', '.join(CONDITIONS)})")
    if wanted.lower() not in ("true", "false"):
        raise InvalidValueError(f"--for {condition!r}: a condition is True or False, not {wanted!r}")
    wanted = wanted.capitalize()
    limit = parse_duration(timeout) if timeout.strip() else None
    deadline = time.monotonic() + (limit if limit is not None else 10**9)
    st = store()
    while True:
        doc = st.models.load()
        model = catalog.resolve_name(doc, name)
        view = views.model_view(doc["models"][model], st.state.load()["instances"].get(model),
                                daemon_record(st) is not None)
        if what == "phase" and view["status"]["phase"] == value:
            break
        if what == "condition" and any(c["type"] == value and c["status"] == wanted
                                       for c in view["status"]["conditions"]):
            break
        if time.monotonic() > deadline:
            raise AthanorError(f"timed out after {timeout} waiting for model/{model} {condition} "
                               f"(phase {view['status']['phase']})")
        time.sleep(0.1)  # polling interval
    click.echo(f"model/{model} condition met")


CONDITIONS = ("Available", "Ready", "Progressing", "Failed", "InsufficientMemory")
