"""Service managers: what runs a model's runtime and the ingress (embedded supervisor, launchd, systemd), or, for a
gateway running in a cluster, each model's Deployment (kubernetes).

Which one runs models is decided where the gateway itself runs. ``athanor install`` registers the ingress with a
service manager (``serviceManager``, or for ``auto``: launchd on macOS, systemd on Linux when ``systemctl --user``
answers, otherwise the embedded supervisor) and tells the ingress which one it is under; models then run as jobs
of the same manager. A gateway started by hand (``athanor serve``, ``athanor up``) with ``auto`` runs its models
with the embedded supervisor, which works on any machine without touching the user's login items.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from athanor.managers.base import Handle, ServiceManager

MANAGERS = ("process", "launchd", "systemd", "kubernetes")
UNDER_ENV = "ATHANOR_SERVICE_MANAGER"  # set in the ingress job: the manager the gateway itself runs under


def installed_manager() -> str:
    """The manager ``athanor install`` picks for ``auto``."""
    if platform.system() == "Darwin":
        return "launchd"
    if systemd_user_available():
        return "systemd"
    return "process"


def systemd_user_available() -> bool:
    """Whether a systemd user manager answers (it does not in containers, or without a login session)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return False
    try:
        result = subprocess.run([systemctl, "--user", "show-environment"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def resolve_manager(configured: str, environ: dict[str, str] | None = None) -> str:
    """The manager that runs models: the configured one, or for ``auto`` the one the gateway runs under."""
    if configured != "auto":
        return configured
    under = (os.environ if environ is None else environ).get(UNDER_ENV, "")
    return under if under in MANAGERS else "process"


def service_dir(manager: str, gateway: dict[str, Any], environ: dict[str, str] | None = None) -> Path | None:
    """Where ``manager`` keeps the gateway's file (None for the embedded supervisor); launchd keeps the models'
    plists in ATHANOR_HOME instead (launchd.py says why)."""
    environ = os.environ if environ is None else environ
    if manager == "launchd":
        configured = gateway.get("launchd", {}).get("agentsDir")
        return Path(configured).expanduser() if configured else Path.home() / "Library" / "LaunchAgents"
    if manager == "systemd":
        config = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config) / "systemd" / "user"
    return None


class Managers:
    """The managers one daemon or command uses, made once each: the configured one starts new jobs; a handle is
    always given back to the manager that made it (a job started before the Gateway switched managers is still
    stopped by its own)."""

    def __init__(self, home: Path):
        self.home = home
        self._made: dict[tuple[Any, ...], ServiceManager] = {}

    def get(self, name: str, gateway: dict[str, Any]) -> ServiceManager:
        if name == "kubernetes":  # one per namespace, context and budget: a changed spec gets a new one
            settings = gateway.get("kubernetes") or {}
            key: tuple[Any, ...] = (name, settings.get("namespace"), settings.get("context"), settings.get("memory"))
            if key not in self._made:
                from athanor.managers.kubernetes import KubernetesManager

                self._made[key] = KubernetesManager(settings)
            return self._made[key]
        directory = service_dir(name, gateway)
        key = (name, directory)
        if key not in self._made:
            self._made[key] = self._make(name, directory)
        return self._made[key]

    async def close(self) -> None:
        """Let go of what managers hold open (a cluster client and its watch); the local ones hold nothing."""
        for manager in self._made.values():
            close = getattr(manager, "close", None)
            if close is not None:
                await close()

    def current(self, gateway: dict[str, Any]) -> ServiceManager:
        return self.get(resolve_manager(gateway["serviceManager"]), gateway)

    def of(self, handle: Handle, gateway: dict[str, Any]) -> ServiceManager:
        """The manager that made ``handle``; ValueError for a handle no manager made."""
        name = handle.get("manager", "process") if isinstance(handle, dict) else None
        if name not in MANAGERS:
            raise ValueError(f"invalid job handle: unknown manager {name!r}")
        return self.get(name, gateway)

    def _make(self, name: str, directory: Path | None) -> ServiceManager:
        if name == "launchd":
            from athanor.managers.launchd import LaunchdManager

            assert directory is not None
            return LaunchdManager(directory, self.home / "launchd")
        if name == "systemd":
            from athanor.managers.systemd import SystemdManager

            assert directory is not None
            return SystemdManager(directory)
        from athanor.managers.process import ProcessManager
        from athanor.runtimes.secret import SECRET_DIR

        return ProcessManager(self.home / "logs", self.home / SECRET_DIR)


def installed_gateway(home: Path, gateway: dict[str, Any]) -> tuple[ServiceManager, Any] | None:
    """(manager, job) of the gateway when ``athanor install`` registered it with launchd or systemd."""
    from athanor.managers import jobs

    managers = Managers(home)
    for name in ("launchd", "systemd"):
        manager = managers.get(name, gateway)
        job = jobs.ingress_job(home, name)
        if manager.installed(job):  # type: ignore[attr-defined]
            return manager, job
    return None
