"""The jobs athanor runs, described once: a model's runtime and the ingress (``athanor serve``).

A model job's environment is exactly what its runtime needs (the launch's own variables): it must not depend on
who renders it, or ``apply`` from a shell and the daemon would write different files for the same spec. The
ingress job carries what the gateway needs to find its files and its runtimes, taken from the environment of
``athanor install``: a service manager starts it with a bare environment otherwise (launchd's PATH has no
Homebrew). That includes the variables the Gateway's ``auth.apiKeyEnv`` and ``auth.adminKeyEnv`` name, or the
installed gateway would refuse every request: their values are written into the gateway's plist or unit, which
``write_if_changed`` makes 0600 (readable by the user alone, like the key files themselves).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from athanor.managers import UNDER_ENV
from athanor.managers.base import Job, sorted_env
from athanor.runtimes.launch import LaunchSpec, with_socket

INGRESS_ENV = ("PATH", "LANG", "LC_ALL", "HF_HOME", "HF_HUB_CACHE", "XDG_CONFIG_HOME")
INGRESS_STOP_S = 90  # the gateway stops every runtime before it exits: its manager must not kill it first


def model_job(name: str, launch: LaunchSpec, home: Path) -> Job:
    argv = with_socket(launch.argv, launch.socket) if launch.socket else launch.argv
    return Job(kind="model", name=name, argv=tuple(argv), env=sorted_env(launch.env), workdir=str(home),
               log_path=str(home / "logs" / f"{name}.log"), socket=launch.socket)


def ingress_job(home: Path, manager: str, environ: Mapping[str, str] | None = None,
                auth: Mapping[str, Any] | None = None) -> Job:
    """``athanor serve`` for ``home`` under ``manager``, run by this Python (the installation athanor runs from).
    The gateway learns which manager it runs under from its environment, and runs its models with the same one.
    ``auth``: the Gateway's ``spec.auth``; the key variables it names are passed when this environment sets them."""
    environ = os.environ if environ is None else environ
    names = (*INGRESS_ENV, *key_variables(auth or {}))
    env = {key: environ[key] for key in names if environ.get(key)}
    env["ATHANOR_HOME"] = str(home)
    env[UNDER_ENV] = manager
    return Job(kind="ingress", name="ingress", argv=(sys.executable, "-m", "athanor", "serve"),
               env=sorted_env(env), workdir=str(home), log_path=str(home / "logs" / "daemon.log"),
               stop_timeout_s=INGRESS_STOP_S)


def key_variables(auth: Mapping[str, Any]) -> tuple[str, ...]:
    """The environment variables ``auth.apiKeyEnv`` and ``auth.adminKeyEnv`` name (the gateway reads its keys
    there)."""
    return tuple(name for name in (auth.get("apiKeyEnv"), auth.get("adminKeyEnv")) if name)
