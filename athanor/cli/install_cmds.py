"""install, uninstall: the gateway as a job of the service manager, started at login and kept running."""

from __future__ import annotations

import asyncio
import os

import click

from athanor import catalog
from athanor.cli.common import store
from athanor.errors import AthanorError
from athanor.liveness import daemon_record

MANAGED = ("launchd", "systemd")


@click.command("install")
@click.option("--manager", type=click.Choice(["launchd", "systemd", "process"]),
              help="Override the Gateway's serviceManager (auto: launchd on macOS, systemd on Linux when "
                   "'systemctl --user' answers, else the embedded supervisor).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the gateway to listen.")
@click.pass_context
def install_cmd(ctx: click.Context, manager: str | None, timeout: float) -> None:
    """Register the gateway with the service manager and start it; models then run as its jobs too (idempotent)."""
    from athanor.addresses import loopback_for, parse_listen, wait_for_port
    from athanor.managers import Managers, installed_manager, jobs

    st = store()
    gateway = catalog.gateway_spec(st.models.load())
    configured = gateway["serviceManager"]
    name = manager or (installed_manager() if configured == "auto" else configured)
    if name == "kubernetes":
        raise AthanorError("serviceManager kubernetes: the gateway runs in the cluster, not on this machine; render "
                           "its manifests and apply them: athanor render --target kubernetes -f SPECS | kubectl apply "
                           "-f -")
    if name == "process":
        from athanor.cli.serve_cmds import up_cmd

        click.echo("the embedded supervisor does not start the gateway at login; starting it now (athanor up). "
                   "launchd (macOS) or systemd (Linux) start it at login: athanor install --manager ...")
        ctx.invoke(up_cmd, listen=None, timeout=timeout)
        return
    service = Managers(st.home).get(name, gateway)
    job = jobs.ingress_job(st.home, name, auth=gateway["auth"])  # the key variables go into its plist/unit
    running = daemon_record(st)
    if running and (not service.installed(job) or asyncio.run(service.job_state(job)).pid != running["pid"]):
        raise AthanorError(f"a gateway started by hand is running (pid {running['pid']}); stop it with "
                           "'athanor down', then install")
    for variable in jobs.key_variables(gateway["auth"]):
        if not os.environ.get(variable):
            click.echo(f"warning: the Gateway's auth names {variable}, which this shell does not set: the installed "
                       "gateway will refuse every request with 503 until 'athanor install' runs again from a shell "
                       "that sets it (or use auth.apiKeyFile)", err=True)
    result = asyncio.run(service.install(job))
    address = gateway["listen"]
    host, port = parse_listen(address)
    if not wait_for_port(loopback_for(host) or host, port, timeout):
        raise AthanorError(f"the gateway did not start listening on {address}; see {job.log_path}")
    where = next(iter(service.files(job)))
    click.echo(f"gateway {result} as {job.label if name == 'launchd' else job.unit} ({name}, {where}); "
               f"serving on http://{address}")
    if name == "systemd":
        click.echo("it starts with your user manager; to keep it running without a login session: "
                   "loginctl enable-linger $USER")


@click.command("uninstall")
def uninstall_cmd() -> None:
    """Stop and remove every job or unit athanor created (the gateway's and every model's), and nothing else."""
    from athanor.managers import Managers

    st = store()
    gateway = catalog.gateway_spec(st.models.load())
    removed: list[str] = []
    for name in MANAGED:
        removed += asyncio.run(Managers(st.home).get(name, gateway).uninstall())
    for item in removed:
        click.echo(f"{item} removed")
    if not removed:
        click.echo("nothing installed")
