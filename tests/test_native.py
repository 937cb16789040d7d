"""The hot path compiled by mypyc (athanor/native.py): used while it matches its sources, Python otherwise.

The compiled build itself is what the rest of the suite runs on: scripts/setup.sh compiles it before the tests, and
the first test here fails when that build is missing or stale on a machine that can compile it.
"""

from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import athanor
import athanor.ingress
from athanor import native
from athanor.native import (
    BUILD_COMMAND,
    BUILD_DIR,
    MODULES,
    STAMP,
    can_compile,
    fingerprint,
    hot_path,
    package_path,
    source_file,
)

EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]
SOURCES = Path(athanor.__file__).parent
PROBE = "import athanor.ingress as i, athanor.{module} as m; print(i.HOT_PATH.compiled, m.__file__)"


@pytest.fixture(autouse=True)
def _compiled_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATHANOR_COMPILED", raising=False)


def loaded(root: Path, module: str, **env: str) -> tuple[bool, str]:
    """In a fresh interpreter importing athanor from ``root``: whether it says compiled, and the module's file."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(root), **env}, cwd=root, check=True)
    compiled, file = result.stdout.split()
    return compiled == "True", file


def test_this_checkout_runs_its_hot_path_compiled_where_it_can_be():
    """setup.sh compiles; the suite then exercises the compiled modules, the daemons it starts included."""
    hot = athanor.ingress.HOT_PATH
    if can_compile():
        assert hot.compiled, f"{hot.reason}: the tests would run the hot path as Python ({BUILD_COMMAND})"
    else:
        assert not hot.compiled
    import athanor.controller.lease as lease
    import athanor.ingress.wire as wire

    assert wire.__file__.endswith(EXTENSION) is hot.compiled
    assert lease.__file__.endswith(EXTENSION) is hot.compiled


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of the hot modules' sources and one module they import, with a build stamped as made from them (its
    files empty: the stamp and their presence decide, not their contents)."""
    root = tmp_path / "athanor"
    for module in MODULES:
        (root / source_file(module)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SOURCES / source_file(module), root / source_file(module))
    shutil.copy(SOURCES / "errors.py", root)  # proxy.py imports athanor.errors
    build = root / BUILD_DIR / "build-1"
    files = [f"{module.replace('.', '/')}{EXTENSION}" for module in (*MODULES, "ingress._hot__mypyc")]
    for name in files:
        (build / name).parent.mkdir(parents=True, exist_ok=True)
        (build / name).touch()
    stamp = {**fingerprint(root, "2.4.1"), "build": build.name, "files": files}
    (root / BUILD_DIR / STAMP).write_text(json.dumps(stamp))
    return root


def test_a_build_is_used_only_while_every_source_matches(package: Path):
    hot = hot_path(package)
    build = package / BUILD_DIR / "build-1"
    assert hot == native.HotPath(True, "compiled (mypyc 2.4.1)", str(build))
    assert package_path(["/src/ingress"], hot, "ingress") == [str(build / "ingress"), "/src/ingress"]
    assert package_path(["/src/controller"], hot, "controller") == [str(build / "controller"), "/src/controller"]

    with (package / "ingress" / "tap.py").open("a") as edited:
        edited.write("# edited\n")
    with (package / "controller" / "lease.py").open("a") as edited:
        edited.write("# edited\n")
    hot = hot_path(package)
    assert hot == native.HotPath(False, "Python: changed since compiled: ingress/tap.py, controller/lease.py")
    assert package_path(["/src/ingress"], hot, "ingress") == ["/src/ingress"]


def test_an_edited_module_the_compiled_ones_import_makes_the_build_stale(package: Path):
    """Compiled code checks the types other modules declare, and takes their constants as they were."""
    stamp = json.loads((package / BUILD_DIR / STAMP).read_text())
    assert "athanor/errors.py" in stamp["depends"]
    assert not set(stamp["depends"]) & {f"athanor/{source_file(module)}" for module in MODULES}
    with (package / "errors.py").open("a") as edited:
        edited.write("# edited\n")
    assert hot_path(package).reason == "Python: changed since compiled: athanor/errors.py"


def test_a_build_missing_a_file_is_not_used(package: Path):
    (package / BUILD_DIR / "build-1" / "controller" / f"lease{EXTENSION}").unlink()
    assert hot_path(package).reason == (f"Python: the build in {package / BUILD_DIR / 'build-1'} lacks "
                                        f"controller/lease{EXTENSION}")


def test_a_build_for_another_interpreter_is_not_used(package: Path):
    stamp_path = package / BUILD_DIR / STAMP
    stamp_path.write_text(json.dumps({**json.loads(stamp_path.read_text()), "abi": ".cpython-312-darwin.so"}))
    assert hot_path(package).reason == (f"Python: compiled for {os.uname().machine} .cpython-312-darwin.so, this "
                                        f"interpreter is {os.uname().machine} {EXTENSION}")


@pytest.mark.parametrize("text", ["", "{not json", "[]", '{"abi": "x"}', json.dumps({"build": "b", "abi": EXTENSION,
                                  "machine": os.uname().machine, "modules": 3}), "[" * 100_000 + "]" * 100_000])
def test_a_damaged_stamp_means_python_and_names_the_file(package: Path, text: str):
    (package / BUILD_DIR / STAMP).write_text(text)
    hot = hot_path(package)
    assert not hot.compiled and hot.reason.startswith(f"Python: {package / BUILD_DIR / STAMP} is unreadable (")


def test_no_build_and_the_switch_off_both_mean_python(package: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ATHANOR_COMPILED", "0")
    assert hot_path(package).reason == "Python: ATHANOR_COMPILED=0"
    monkeypatch.delenv("ATHANOR_COMPILED")
    shutil.rmtree(package / BUILD_DIR)
    assert hot_path(package).reason == "Python: not compiled"


def test_a_current_build_is_not_compiled_again_even_when_told_to_run_python(monkeypatch, capsys):
    """ATHANOR_COMPILED=0 says how to run, not whether the build is current (setup.sh builds with the user's
    environment)."""
    if not athanor.ingress.HOT_PATH.compiled:
        assert not can_compile()  # the first test fails for this checkout; nothing more to check here
        return
    monkeypatch.setenv("ATHANOR_COMPILED", "0")
    assert native.main(["build"]) == 0
    assert capsys.readouterr().out == "athanor's hot path: compiled (mypyc 2.4.1), up to date\n"


def test_an_interpreter_loads_the_build_and_leaves_it_for_an_edited_source(tmp_path: Path):
    """The real import machinery: the extension modules and their shared library found through ``__path__``
    from wherever the package is, and Python's modules in their place once a source differs, a compiled one's or
    one it imports."""
    if not athanor.ingress.HOT_PATH.compiled:
        assert not can_compile()  # the first test fails for this checkout; nothing more to check here
        return
    root = tmp_path / "copy"
    shutil.copytree(SOURCES, root / "athanor", ignore=shutil.ignore_patterns("__pycache__"))  # times kept
    package = root / "athanor"
    build = package / BUILD_DIR / Path(athanor.ingress.HOT_PATH.directory or "").name
    assert loaded(root, "ingress.upstream") == (True, str(build / "ingress" / f"upstream{EXTENSION}"))
    assert loaded(root, "controller.lease") == (True, str(build / "controller" / f"lease{EXTENSION}"))
    assert loaded(root, "ingress.upstream", ATHANOR_COMPILED="0") == (False, str(package / "ingress" / "upstream.py"))

    with (package / "ingress" / "heads.py").open("a") as edited:
        edited.write("# edited\n")
    assert loaded(root, "ingress.upstream") == (False, str(package / "ingress" / "upstream.py"))
    assert loaded(root, "controller.lease") == (False, str(package / "controller" / "lease.py"))
    shutil.copy2(SOURCES / "ingress" / "heads.py", package / "ingress" / "heads.py")
    assert loaded(root, "controller.lease")[0]
    with (package / "controller" / "phase.py").open("a") as edited:  # imported by a compiled module, not compiled
        edited.write("# edited\n")
    assert loaded(root, "ingress.upstream") == (False, str(package / "ingress" / "upstream.py"))


def test_each_exception_name_in_a_compiled_function_is_bound_to_one_type():
    """mypyc types a local by its first binding, ``except ... as`` names included (mypy allows a name per clause):
    a second clause binding the same name to another type raised TypeError in the compiled module, in place of
    handling the error (a failed start answered 500, not 503)."""
    reused = []
    for name in MODULES:
        tree = ast.parse((SOURCES / source_file(name)).read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            bound: dict[str, set[str]] = {}
            for node in _own_nodes(function):
                if isinstance(node, ast.ExceptHandler) and node.name:
                    bound.setdefault(node.name, set()).add(ast.unparse(node.type) if node.type else "")
            reused += [f"{source_file(name)} {function.name}(): {var} as {sorted(types)}"
                       for var, types in bound.items() if len(types) > 1]
    assert not reused


def _own_nodes(function: ast.AST) -> list[ast.AST]:
    """The function's nodes, without those of functions nested in it (each is checked on its own)."""
    nodes, todo = [], list(ast.iter_child_nodes(function))
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo += ast.iter_child_nodes(node)
    return nodes
