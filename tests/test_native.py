"""The hot path compiled by mypyc (athanor/native.py): used while it matches its sources, Python otherwise.

The compiled build itself is what the rest of the suite runs on: scripts/setup.sh compiles it before the tests, and
the first test here fails when that build is missing or stale on a machine that can compile it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import athanor
import athanor.ingress
from athanor.native import BUILD_COMMAND, BUILD_DIR, MODULES, STAMP, fingerprint, hot_path, package_path

EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]
PROBE = "import athanor.ingress as i, athanor.ingress.{module} as m; print(i.HOT_PATH.compiled, m.__file__)"


def loaded(root: Path, module: str, **env: str) -> tuple[bool, str]:
    """In a fresh interpreter importing athanor from ``root``: whether it says compiled, and the module's file."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), **env}, cwd=root, check=True)
    compiled, file = result.stdout.split()
    return compiled == "True", file


def can_compile() -> bool:
    return importlib.util.find_spec("mypyc") is not None and shutil.which("cc") is not None


def test_this_checkout_runs_its_hot_path_compiled_where_it_can_be():
    """setup.sh compiles; the suite then exercises the compiled modules, the daemons it starts included."""
    hot = athanor.ingress.HOT_PATH
    if can_compile():
        assert hot.compiled, f"{hot.reason}: the tests would run the hot path as Python"
    else:
        assert not hot.compiled and BUILD_COMMAND in hot.reason
    import athanor.ingress.wire as wire

    assert wire.__file__.endswith(EXTENSION) is hot.compiled


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of the hot modules' sources with a build stamp that matches them (no extension modules needed: the
    stamp alone decides)."""
    ingress = tmp_path / "ingress"
    ingress.mkdir()
    for name in MODULES:
        shutil.copy(Path(athanor.ingress.__file__).parent / f"{name}.py", ingress / f"{name}.py")
    (ingress / BUILD_DIR).mkdir()
    (ingress / BUILD_DIR / STAMP).write_text(json.dumps({**fingerprint(ingress), "mypy": "2.4.1"}))
    return ingress


def test_a_build_is_used_only_while_every_source_matches(package: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ATHANOR_COMPILED", raising=False)
    hot = hot_path(package)
    assert hot.compiled and hot.reason == "compiled (mypyc 2.4.1)"
    assert package_path(["/src/ingress"], hot, package) == [str(package / BUILD_DIR), "/src/ingress"]

    with (package / "tap.py").open("a") as source:
        source.write("# edited\n")
    hot = hot_path(package)
    assert not hot.compiled
    assert hot.reason == f"Python: changed since compiled: tap.py ({BUILD_COMMAND})"
    assert package_path(["/src/ingress"], hot, package) == ["/src/ingress"]


def test_a_build_for_another_interpreter_is_not_used(package: Path):
    stamp = package / BUILD_DIR / STAMP
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "abi": ".cpython-312-darwin.so"}))
    hot = hot_path(package)
    assert not hot.compiled
    assert hot.reason.startswith(f"Python: compiled for .cpython-312-darwin.so, this interpreter loads {EXTENSION}")


@pytest.mark.parametrize("text", ["", "{not json", "[]", '{"abi": "x"}', json.dumps({"abi": EXTENSION, "modules": 3}),
                                  json.dumps({"abi": EXTENSION, "modules": {"wire": 1}})])
def test_a_damaged_stamp_means_python_and_says_which_file(package: Path, text: str):
    (package / BUILD_DIR / STAMP).write_text(text)
    hot = hot_path(package)
    assert not hot.compiled
    assert str(package / BUILD_DIR / STAMP) in hot.reason or "changed since compiled" in hot.reason


def test_no_build_and_the_switch_off_both_mean_python(package: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ATHANOR_COMPILED", "0")
    assert hot_path(package).reason == "Python: ATHANOR_COMPILED=0"
    monkeypatch.delenv("ATHANOR_COMPILED")
    shutil.rmtree(package / BUILD_DIR)
    assert hot_path(package).reason == f"Python: not compiled ({BUILD_COMMAND})"


@pytest.mark.skipif(not (Path(athanor.ingress.__file__).parent / BUILD_DIR / STAMP).exists(),
                    reason="no build in this checkout (the first test says why)")
def test_an_interpreter_loads_the_build_and_leaves_it_for_an_edited_source(tmp_path: Path):
    """The real import machinery: the extension modules and their shared library found through ``__path__``
    from wherever the package is, and Python's modules in their place once one source differs."""
    root = tmp_path / "copy"
    shutil.copytree(Path(athanor.__file__).parent, root / "athanor",
                    ignore=shutil.ignore_patterns("__pycache__", f"{BUILD_DIR}.*"))
    ingress = root / "athanor" / "ingress"
    compiled, file = loaded(root, "upstream")
    assert compiled and file == str(ingress / BUILD_DIR / f"upstream{EXTENSION}")
    assert loaded(root, "upstream", ATHANOR_COMPILED="0") == (False, str(ingress / "upstream.py"))

    with (ingress / "heads.py").open("a") as source:
        source.write("# edited\n")
    assert loaded(root, "upstream") == (False, str(ingress / "upstream.py"))


def test_each_exception_name_in_a_compiled_function_is_bound_to_one_type():
    """mypyc types a local by its first binding, ``except ... as`` names included (mypy allows a name per clause):
    a second clause binding the same name to another type raised TypeError in the compiled module, in place of
    handling the error (a failed start answered 500, not 503)."""
    import ast

    reused = []
    for name in MODULES:
        source = Path(athanor.ingress.__file__).parent / f"{name}.py"
        for function in ast.walk(ast.parse(source.read_text())):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                bound: dict[str, set[str]] = {}
                for node in ast.walk(function):
                    if isinstance(node, ast.ExceptHandler) and node.name:
                        bound.setdefault(node.name, set()).add(ast.unparse(node.type) if node.type else "")
                reused += [f"{name}.py {function.name}(): {var} as {sorted(types)}"
                           for var, types in bound.items() if len(types) > 1]
    assert not reused
