"""The gateway's hot path compiled to C by mypyc, used only while it matches the sources it was built from.

Why: on a small machine the client, the gateway and the runtime share the cores, so every microsecond the gateway
spends on a proxied request is taken from the other two (README, "The hot path"). The modules each proxied request
runs through are compiled unchanged, as C extensions: in ``athanor.ingress`` the front door, the upstream pool,
the fast path, the heads' memo, the usage tap, the body's reading, the guard and the limits; in
``athanor.controller`` the admission (``use_now``), the lease, the instance's counts and the desired state's
freshness. The same code, about a third of its time in-process.

How it stays safe:
- The build lives apart from the sources, under ``athanor/_compiled/``, with a stamp holding the hash of each
  compiled source, the size and time of every athanor module they import (compiled code checks the types those
  declare, and takes their constants as they were), the interpreter's extension ABI and the machine, and the
  files the build made. ``athanor.ingress`` and ``athanor.controller`` put the build's directory for them ahead of
  their own on their ``__path__`` only while all of it matches: an edited module runs as Python, never against a
  stale build. Both ask once per process (``for_this_process``), so they agree.
- Nothing needs it. Without mypy or a C compiler (a wheel, a Mac without Xcode's tools) the same modules run as
  Python; ``ATHANOR_COMPILED=0`` runs them as Python anyway (profiling with cProfile or py-spy's Python frames,
  debugging).
- Each build goes in a directory of its own, and the stamp that names it replaces the old one in one rename: a
  process starting meanwhile loads the old build or the new one whole. The build before stays (a process may have
  read the old stamp and not yet imported); older ones are removed.

    python -m athanor.native build     compile, unless the build is current (scripts/setup.sh runs it)
    python -m athanor.native status    compiled or not, and why
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent  # the athanor package
BUILD_DIR = "_compiled"  # in the package: the stamp, and a directory per build (a subdirectory per package)
STAMP = "stamp.json"
# Every proxied request runs through these, and they type-check under mypy as mypyc needs. One group: they call
# one another as C, so they are compiled (and loaded) together or not at all. Each package listed here sets its
# ``__path__`` with ``package_path``.
MODULES = ("ingress.heads", "ingress.requests", "ingress.tap", "ingress.upstream", "ingress.wire", "ingress.proxy",
           "ingress.guard", "ingress.limits", "ingress.counters", "ingress.keycache", "controller.changes",
           "controller.desired", "controller.dirwatch", "controller.instance", "controller.lease",
           "controller.controller")
PACKAGES = tuple(sorted({module.split(".")[0] for module in MODULES}))
GROUP = "athanor.ingress._hot"  # the group's shared library, beside the ingress modules
BUILD_COMMAND = f"{sys.executable} -m athanor.native build"
USAGE = "usage: python -m athanor.native build|status"


class BuildFailed(Exception):
    pass


@dataclass(frozen=True)
class HotPath:
    """Whether the hot modules run compiled, and in words why (doctor, the daemon's log)."""

    compiled: bool
    reason: str
    directory: str | None = None  # the build's, when compiled


def hot_path(root: Path = ROOT) -> HotPath:
    """Never raises: a missing, foreign or damaged build only means the modules run as Python."""
    if os.environ.get("ATHANOR_COMPILED", "").strip() == "0":
        return HotPath(False, "Python: ATHANOR_COMPILED=0")
    return _current(root)


@functools.cache
def for_this_process() -> HotPath:
    """``hot_path()``, asked once per process: every package with compiled modules loads from the same build, or
    none does."""
    return hot_path()


def package_path(path: list[str], hot: HotPath, package: str) -> list[str]:
    """The ``__path__`` of ``athanor.<package>``: the build's directory for it first while the build matches."""
    return [os.path.join(hot.directory, package), *path] if hot.compiled and hot.directory else path


def _current(root: Path) -> HotPath:
    stamp_path = root / BUILD_DIR / STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
        built = root / BUILD_DIR / stamp["build"]
        if stamp["abi"] != _abi() or stamp["machine"] != os.uname().machine:
            return HotPath(False, f"Python: compiled for {stamp['machine']} {stamp['abi']}, this interpreter is "
                                  f"{os.uname().machine} {_abi()}")
        sources = _sources(root)
        changed = [source_file(module) for module in MODULES if stamp["modules"].get(module) != sources[module]]
        changed += [path for path, seen in stamp["depends"].items() if _seen(root.parent / path) != seen]
        if changed:
            return HotPath(False, f"Python: changed since compiled: {', '.join(changed)}")
        missing = [name for name in stamp["files"] if not (built / name).is_file()]
        if missing or not stamp["files"]:
            return HotPath(False, f"Python: the build in {built} lacks {', '.join(missing) or 'every file'}")
        return HotPath(True, f"compiled (mypyc {stamp['mypy']})", str(built))
    except FileNotFoundError:
        return HotPath(False, "Python: not compiled")
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the stamp, Python runs
        return HotPath(False, f"Python: {stamp_path} is unreadable ({type(exc).__name__}: {exc})")


def can_compile() -> bool:
    """mypyc installed, and a C compiler for it on PATH."""
    import importlib.util
    import shutil

    return importlib.util.find_spec("mypyc") is not None and any(
        shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "cc", "gcc", "clang"))


def fingerprint(root: Path, mypy_version: str) -> dict[str, Any]:
    """What a build of the MODULES under ``root`` made now is stamped with (``build`` and ``files`` follow)."""
    return {"abi": _abi(), "machine": os.uname().machine, "mypy": mypy_version, "modules": _sources(root),
            "depends": {str(path.relative_to(root.parent)): _seen(path) for path in _depends(root)}}


def _abi() -> str:
    return EXTENSION_SUFFIXES[0]  # what this interpreter's extension modules end in: ".cpython-311-x86_64-linux-gnu.so"


def source_file(module: str) -> str:
    """A compiled module's source, relative to the athanor package: ``ingress/wire.py``."""
    return module.replace(".", "/") + ".py"


def _sources(root: Path) -> dict[str, str]:
    return {module: hashlib.sha256((root / source_file(module)).read_bytes()).hexdigest() for module in MODULES}


def _seen(path: Path) -> list[int] | None:
    """A dependency's size and modification time: cheap enough for every start of a gateway, and an edit changes
    them (a touch without an edit only costs a build)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _depends(root: Path) -> list[Path]:
    """The athanor modules the compiled ones import, directly or not (TYPE_CHECKING and function-level imports
    included: mypy reads them all), by their sources' import statements."""
    import ast

    top = root.parent  # where "athanor" is found
    found: dict[str, Path] = {}
    todo = [f"athanor.{module}" for module in MODULES]
    while todo:
        module = todo.pop()
        if module in found:
            continue
        parts = module.split(".")
        path = next((p for p in (top.joinpath(*parts, "__init__.py"), top.joinpath(*parts).with_suffix(".py"))
                     if p.is_file()), None)
        if path is None:  # a name imported from a module, not a module
            continue
        found[module] = path
        for node in ast.walk(ast.parse(path.read_bytes())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                if name.split(".")[0] == "athanor":  # and every package on the way, for its __init__
                    todo += [".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 2)]
    compiled = {root / source_file(module) for module in MODULES}
    return sorted(path for path in found.values() if path not in compiled)


def build(root: Path = ROOT) -> HotPath:
    """Compile MODULES with mypyc and put the build in place of the last one. Raises BuildFailed, saying why."""
    import shutil
    import tempfile

    try:
        import mypy.version
        import setuptools
        from mypyc.build import mypycify
    except ImportError as exc:
        raise BuildFailed(f"mypy (mypyc) and setuptools are needed to compile: pip install "
                          f"'athanor-gateway[compiled]' ({exc})") from None
    if not can_compile():
        raise BuildFailed("no C compiler (cc, gcc or clang) on PATH")
    # Taken before compiling: a source edited during the build leaves a stamp that does not match (Python runs),
    # never one that matches code the build did not see.
    stamp = fingerprint(root, mypy.version.__version__)
    sources = [str((root / source_file(module)).resolve()) for module in MODULES]
    builds = root / BUILD_DIR
    with tempfile.TemporaryDirectory(prefix="athanor-mypyc-") as work_dir:
        work = Path(work_dir)
        here = Path.cwd()
        os.chdir(work)  # setuptools reads a pyproject.toml where it runs; mypy writes its cache there
        try:
            setuptools.setup(
                name="athanor-hot-path",
                ext_modules=mypycify(sources, group_name=GROUP, target_dir=str(work / "c")),
                script_args=["--quiet", "build_ext", "--build-lib", str(work / "lib"), "--build-temp",
                             str(work / "o")],
            )
        except SystemExit as exc:  # mypy's type errors and the compiler's, already printed
            raise BuildFailed(f"mypyc failed ({exc})") from None
        finally:
            os.chdir(here)
        lib = work / "lib" / "athanor"
        made = sorted(path.relative_to(lib) for package in PACKAGES for path in (lib / package).glob(f"*{_abi()}"))
        if not made:
            raise BuildFailed(f"mypyc produced no extension modules in {work / 'lib'}")
        try:
            builds.mkdir(exist_ok=True)
            fresh = Path(tempfile.mkdtemp(prefix="build-", dir=builds))
            for extension in made:
                (fresh / extension.parent).mkdir(exist_ok=True)
                shutil.copy2(lib / extension, fresh / extension)
            stamp.update(build=fresh.name, files=[str(extension) for extension in made])
            previous = _named_build(builds / STAMP)
            written = fresh.with_suffix(".stamp")
            written.write_text(json.dumps(stamp, indent=2) + "\n")
            os.replace(written, builds / STAMP)
        except OSError as exc:
            raise BuildFailed(f"cannot install the build in {builds}: {exc}") from None
    for old in builds.iterdir():
        if old.name not in (fresh.name, previous, STAMP):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    shutil.rmtree(root / "ingress" / BUILD_DIR, ignore_errors=True)  # where builds went before they moved here
    return _current(root)


def _named_build(stamp_path: Path) -> str | None:
    try:
        return str(json.loads(stamp_path.read_text())["build"])
    except Exception:  # noqa: BLE001 - no stamp, or a damaged one: no build to keep
        return None


def main(argv: list[str]) -> int:
    if argv == ["status"]:
        hot = hot_path()
        print(hot.reason if hot.compiled else f"{hot.reason} (to compile: {BUILD_COMMAND})")
        return 0
    if argv == ["build"]:
        current = _current(ROOT)  # not hot_path(): ATHANOR_COMPILED=0 says how to run, not whether to build
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
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
