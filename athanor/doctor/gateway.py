"""The checks of the gateway as a service: the manager that runs models, the gateway's own job (installed with
launchd or systemd, or started by hand) and whether the running gateway answers /health.

They ask other programs (``systemctl``, ``launchctl``, the gateway over HTTP) rather than files; a failure names
``athanor install``, ``athanor up`` or the Gateway setting that fixes it.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from athanor.doctor.check import GATEWAY_FIX, Check
from athanor.doctor.context import Context
from athanor.errors import AthanorError
from athanor.managers import installed_gateway

HEALTH_TIMEOUT_S = 3.0


def check_service_manager(ctx: Context) -> Iterator[Check]:
    """The configured manager, whether it works here, and (with a gateway running) the one it runs models with."""
    check = _configured_manager(ctx)
    if ctx.daemon and ctx.daemon.get("manager"):
        check = replace(check, detail=f"{check.detail}; the running gateway runs models with "
                                      f"{ctx.daemon['manager']}")
    yield check


def _configured_manager(ctx: Context) -> Check:
    configured = ctx.gateway["serviceManager"]
    if configured == "auto":
        if ctx.system == "Darwin":
            install = "launchd"
        elif ctx.systemd:
            install = "systemd (a systemd user manager answers)"
        else:
            install = "the embedded supervisor ('systemctl --user' does not answer: no start at login)"
        return Check(True, "service manager", f"auto: models run under the gateway's own manager; 'athanor install' "
                                              f"would use {install}")
    fix = f"{GATEWAY_FIX} with spec.serviceManager: auto"
    if configured == "launchd" and ctx.system != "Darwin":
        return Check(False, "service manager", "launchd is configured, but launchd is macOS's", fix, required=True)
    if configured == "systemd" and not ctx.systemd:
        return Check(False, "service manager", "systemd is configured, but no systemd user manager answers "
                                               "('systemctl --user show-environment')", fix, required=True)
    if configured == "kubernetes":
        return _kubernetes(ctx.gateway.get("kubernetes") or {})
    return Check(True, "service manager", f"{configured} (Gateway spec.serviceManager)")


def _kubernetes(settings: dict[str, Any]) -> Check:
    """What a gateway with ``serviceManager: kubernetes`` needs where it runs: the client, and credentials (the
    pod's service account in a cluster, else a kubeconfig). Whether the API answers is the gateway's to say."""
    import importlib.util
    import os

    namespace = settings.get("namespace", "athanor")
    if importlib.util.find_spec("kubernetes_asyncio") is None:
        return Check(False, "service manager", "kubernetes is configured, but its client is not installed",
                     "pip install 'athanor-gateway[kubernetes]'", required=True)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return Check(True, "service manager", f"kubernetes, in a cluster (its service account), namespace {namespace}")
    kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    if not os.path.isfile(kubeconfig):
        return Check(False, "service manager", f"kubernetes is configured, but this is not a cluster's pod and there "
                     f"is no kubeconfig ({kubeconfig})", "run the gateway in the cluster (athanor render --target "
                     "kubernetes), or set KUBECONFIG", required=True)
    context = settings.get("context") or "its current context"
    return Check(True, "service manager", f"kubernetes, from {kubeconfig} at {context}, namespace {namespace}")


def check_gateway_job(ctx: Context) -> Iterator[Check]:
    """Whether ``athanor install`` registered the gateway with launchd or systemd, and whether that job runs; a
    gateway started by hand (``athanor up``) is fine too."""
    running = f"running (pid {ctx.daemon['pid']}, {ctx.daemon['listen']})" if ctx.daemon else "not running"
    try:
        installed = installed_gateway(ctx.store.home, ctx.gateway)
    except (AthanorError, OSError) as exc:
        yield Check(False, "gateway job", f"cannot tell whether the gateway is installed: {exc}", "athanor install")
        return
    if installed is None:
        if ctx.daemon:
            yield Check(True, "gateway job", f"not installed, started by hand: {running}")
        else:
            fix = "athanor install" if ctx.system == "Darwin" or ctx.systemd else "athanor up"
            yield Check(False, "gateway job", "not installed, not running", fix)
        return
    manager, job = installed
    path = manager.plist_path(job) if manager.name == "launchd" else manager.unit_path(job)
    where = f"installed with {manager.name} ({path})"
    try:
        state = asyncio.run(manager.job_state(job))
    except (AthanorError, OSError, subprocess.SubprocessError) as exc:
        yield Check(False, "gateway job", f"{where}, its state unknown: {exc}", "athanor install")
        return
    if state.running:
        yield Check(True, "gateway job", f"{where}, running (pid {state.pid})")
    else:
        yield Check(False, "gateway job", f"{where}, not running" + (f" ({state.detail})" if state.detail else ""),
                    "athanor up")


def check_ingress(ctx: Context) -> Iterator[Check]:
    """The running gateway answers its /health (on the admin listener when it has one); required once a gateway
    runs, since a gateway that does not answer serves nothing."""
    if not ctx.daemon:
        yield Check(False, "ingress", f"no gateway is running to answer http://{ctx.gateway['listen']}/health",
                    "athanor up")
        return
    address = ctx.daemon.get("admin") or ctx.daemon["listen"]
    url = f"http://{address}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    started = time.monotonic()
    try:
        with opener.open(url, timeout=HEALTH_TIMEOUT_S) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        yield Check(False, "ingress", f"the gateway (pid {ctx.daemon['pid']}) does not answer {url}: {reason}",
                    "athanor down && athanor up", required=True)
        return
    took = (time.monotonic() - started) * 1000
    if status != 200:
        yield Check(False, "ingress", f"{url} answered {status}", "athanor down && athanor up", required=True)
        return
    yield Check(True, "ingress", f"{url} answered 200 in {took:.0f} ms")


def check_hot_path(ctx: Context) -> Iterator[Check]:
    """The gateway's hot modules compiled (athanor/native.py): not required, a Python hot path serves the same
    answers with about a fifth more CPU per request."""
    from athanor.native import BUILD_COMMAND, hot_path

    hot = hot_path()
    yield Check(hot.compiled, "hot path", hot.reason, None if hot.compiled else BUILD_COMMAND)
