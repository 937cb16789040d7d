"""The gateway's hot path compiled to C by mypyc, used only while it matches the sources it was built from.

Why: on a small machine the client, the gateway and the runtime share the cores, so every microsecond the gateway
spends on a proxied request is taken from the other two (README, "The hot path"). The modules each proxied request
runs through (the front door, the upstream pool, the fast path, the heads' memo, the usage tap, the body's reading)
are compiled unchanged, as C extensions: the same code, about a fifth less of the gateway's CPU per request.

How it stays safe:
- The build lives apart from the sources, in ``athanor/ingress/_compiled/``, with a stamp holding the hash of each
  source it was compiled from. ``athanor.ingress`` puts that directory ahead of its own on its ``__path__`` only
  while every hash and the interpreter's ABI match: an edited source runs as Python, never as a stale build.
- Nothing needs it. Without mypy or a C compiler (a wheel, a Mac without Xcode's tools) the same modules run as
  Python; ``ATHANOR_COMPILED=0`` runs them as Python anyway (profiling with cProfile or py-spy's Python frames,
  debugging).
- A build replaces the last one whole, and writes its stamp last: an interrupted build leaves the old one or none.

    python -m athanor.native build     compile, unless the build is current (scripts/setup.sh runs it)
    python -m athanor.native status    compiled or not, and why
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

INGRESS = Path(__file__).parent / "ingress"
BUILD_DIR = "_compiled"
STAMP = "stamp.json"
# Every proxied request runs through these, and they type-check under mypy as mypyc needs. One group: they call
# one another as C, so they are compiled (and loaded) together or not at all.
MODULES = ("heads", "requests", "tap", "upstream", "wire", "proxy")
GROUP = "athanor.ingress._hot"  # the shared library of the group, next to the modules
BUILD_COMMAND = "python -m athanor.native build"


class BuildFailed(Exception):
    pass


@dataclass(frozen=True)
class HotPath:
    """Whether ``athanor.ingress`` runs its hot modules compiled, and in words why (doctor, the daemon's log)."""

    compiled: bool
    reason: str


def _abi() -> str:
    return EXTENSION_SUFFIXES[0]  # what this interpreter's extension modules end in: ".cpython-311-x86_64-linux-gnu.so"


def fingerprint(package: Path = INGRESS) -> dict[str, Any]:
    """What a build must match to be used: the interpreter's extension ABI and each module's source."""
    return {"abi": _abi(),
            "modules": {name: hashlib.sha256((package / f"{name}.py").read_bytes()).hexdigest() for name in MODULES}}


def hot_path(package: Path = INGRESS) -> HotPath:
    """Never raises: a missing, foreign or damaged build only means the modules run as Python."""
    if os.environ.get("ATHANOR_COMPILED", "").strip() == "0":
        return HotPath(False, "Python: ATHANOR_COMPILED=0")
    stamp_path = package / BUILD_DIR / STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
        built_abi, built = stamp["abi"], stamp["modules"]
        current = fingerprint(package)
    except FileNotFoundError:
        return HotPath(False, f"Python: not compiled ({BUILD_COMMAND})")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return HotPath(False, f"Python: {stamp_path} is unreadable ({type(exc).__name__}: {exc}); {BUILD_COMMAND}")
    if built_abi != current["abi"]:
        return HotPath(False, f"Python: compiled for {built_abi}, this interpreter loads {current['abi']} "
                              f"({BUILD_COMMAND})")
    changed = [f"{name}.py" for name in MODULES
               if not isinstance(built, dict) or built.get(name) != current["modules"][name]]
    if changed:
        return HotPath(False, f"Python: changed since compiled: {', '.join(changed)} ({BUILD_COMMAND})")
    return HotPath(True, f"compiled (mypyc {stamp.get('mypy', '?')})")


def package_path(path: list[str], hot: HotPath, package: Path = INGRESS) -> list[str]:
    """``athanor.ingress``'s ``__path__``: the build's directory first while it matches the sources."""
    return [str(package / BUILD_DIR), *path] if hot.compiled else path


def build(package: Path = INGRESS) -> HotPath:
    """Compile MODULES with mypyc and put the result in place of the last build. Raises BuildFailed, saying why."""
    import shutil
    import tempfile

    try:
        import mypy.version
        import setuptools
        from mypyc.build import mypycify
    except ImportError as exc:
        raise BuildFailed(f"mypy (mypyc) and setuptools are needed to compile: pip install "
                          f"'athanor-gateway[compiled]' ({exc})") from None
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        raise BuildFailed("no C compiler (cc) on PATH")
    # Taken before compiling: a source edited during the build leaves a stamp that does not match (Python runs),
    # never one that matches code the build did not see.
    stamp = {**fingerprint(package), "mypy": mypy.version.__version__}
    sources = [str((package / f"{name}.py").resolve()) for name in MODULES]
    with tempfile.TemporaryDirectory(prefix="athanor-mypyc-") as work_dir:
        work = Path(work_dir)
        here = Path.cwd()
        os.chdir(work)  # setuptools reads a pyproject.toml where it runs; mypy writes its cache there
        try:
            setuptools.setup(
                name="athanor-hot-path",
                ext_modules=mypycify(sources, group_name=GROUP, target_dir=str(work / "c")),
                script_args=["--quiet", "build_ext", "--build-lib", str(work / "lib"), "--build-temp",
                             str(work / "o"), f"--parallel={os.cpu_count() or 1}"],
            )
        except SystemExit as exc:  # mypy's type errors and the compiler's, already printed
            raise BuildFailed(f"mypyc failed ({exc})") from None
        finally:
            os.chdir(here)
        built = sorted((work / "lib" / "athanor" / "ingress").glob(f"*{_abi()}"))
        if not built:
            raise BuildFailed(f"mypyc produced no extension modules in {work / 'lib'}")
        fresh, target, old = (package / f"{BUILD_DIR}.new", package / BUILD_DIR, package / f"{BUILD_DIR}.old")
        for leftover in (fresh, old):
            shutil.rmtree(leftover, ignore_errors=True)
        fresh.mkdir()
        for extension in built:
            shutil.copy2(extension, fresh / extension.name)
        (fresh / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        if target.exists():
            target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    return hot_path(package)


def main(argv: list[str]) -> int:
    if argv == ["status"]:
        print(hot_path().reason)
        return 0
    if argv == ["build"]:
        current = hot_path()
        if current.compiled:
            print(f"athanor's hot path: {current.reason}, up to date")
            return 0
        try:
            result = build()
        except BuildFailed as exc:
            print(f"athanor: the hot path stays Python: {exc}", file=sys.stderr)
            return 1
        print(f"athanor's hot path: {result.reason}")
        return 0 if result.compiled else 1
    print(__doc__.rsplit("\n\n", 1)[-1].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
