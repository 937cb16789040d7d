"""The helpers several layers share (one each): stored times, the HF cache location, and modules that no longer
import each other."""

from __future__ import annotations

import ast
from datetime import datetime
from pathlib import Path

import pytest

from athanor.discovery.hfcache import hf_cache_dir, hf_cache_location
from athanor.timestamps import UTC_FORMAT, utc_timestamp

PACKAGE = Path(__file__).resolve().parents[1] / "athanor"


def _imports(module: str) -> set[str]:
    """Every athanor module ``module`` imports anywhere in its file: at the top, in functions, under TYPE_CHECKING."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        path = PACKAGE.joinpath(*module.split(".")[1:], "__init__.py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("a, b", [("athanor.cli.install_cmds", "athanor.cli.serve_cmds"),
                                  ("athanor.doctor.context", "athanor.doctor.runtimes"),
                                  ("athanor.runtimes.launch", "athanor.doctor.probe")])
def test_these_modules_do_not_import_each_other(a, b):
    assert not (b in _imports(a) and a in _imports(b)), f"{a} and {b} import each other"


def test_only_the_user_interfaces_import_actions():
    """``actions.py`` is the store transactions of the CLI and the TUI (which makes the same calls); the layers below
    them (daemon, controller, managers, doctor, fit, hub) take what they need from lower modules
    (``runtimes/resolve.py``, ``registry.py``, ``catalog.py``)."""
    importers = sorted(
        name for path in PACKAGE.rglob("*.py")
        if not (name := _module_name(path)).startswith(("athanor.cli.", "athanor.tui.", "athanor.actions"))
        and "athanor.actions" in _imports(name)
    )
    assert importers == []


def test_the_controller_package_has_no_import_cycle():
    """The controller is split into modules with one job each (monitor, deaths, health, spec changes, re-attach,
    records ...); they take what they need from ``controller.py`` through protocols and callables, never by
    importing it, so the package imports in one direction."""
    package = "athanor.controller"
    modules = {_module_name(path) for path in PACKAGE.joinpath("controller").glob("*.py")} - {package}
    graph = {name: {other for other in _imports(name) if other in modules and other != name} for name in modules}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, path + [name])
        done.add(name)

    for name in sorted(modules):
        visit(name, [])


def test_stored_times_are_utc_with_a_z():
    assert utc_timestamp(0) == "1970-01-01T00:00:00Z"
    assert utc_timestamp(1.2345, millis=True) == "1970-01-01T00:00:01.234Z"
    datetime.strptime(utc_timestamp(), UTC_FORMAT)  # what a process handle's started_at is checked against


def test_the_hf_cache_is_the_gateways_then_the_hubs_rules(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache_location({}) == (tmp_path / "xdg" / "huggingface" / "hub", "default")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_location(None) == (tmp_path / "home" / "hub", "HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_cache_location({"hfCache": True}) == (tmp_path / "hub", "HF_HUB_CACHE")
    configured = {"hfCacheDir": str(tmp_path / "mine")}
    assert hf_cache_location(configured) == (tmp_path / "mine", "Gateway spec.discovery.hfCacheDir")
    assert hf_cache_dir(configured) == tmp_path / "mine" and hf_cache_dir() == tmp_path / "hub"


def _route_literals(module: str) -> list[str]:
    """The ``/v1/...`` strings a module spells out in set or tuple literals (a route set of its own)."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    return [elt.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Set, ast.Tuple))
            for elt in node.elts if isinstance(elt, ast.Constant) and str(elt.value).startswith("/v1/")]


@pytest.mark.parametrize("module", ["athanor.runtimes.launch", "athanor.ingress.tap", "athanor.ingress.requests",
                                    "athanor.ingress.app", "athanor.ingress.proxy"])
def test_route_sets_are_read_from_the_one_table(module):
    assert _route_literals(module) == [], f"{module} keeps a route set of its own; derive it from runtimes/routes.py"


def test_the_route_table_gives_each_set():
    from athanor.ingress import proxy, requests
    from athanor.runtimes import routes
    from athanor.runtimes.launch import RUNTIMES

    named = set().union(*(route.runtimes for route in routes.ROUTES.values()))
    assert named == set(RUNTIMES), "every runtime the table names has a row in RUNTIMES, and each serves a route"
    for name, kind in RUNTIMES.items():
        assert kind.routes == {path for path, route in routes.ROUTES.items() if name in route.runtimes}
    assert routes.ALL_ROUTES == set().union(*(kind.routes for kind in RUNTIMES.values()))
    assert proxy.ALL_ROUTES is routes.ALL_ROUTES and proxy.USAGE_ROUTES is routes.USAGE_ROUTES
    assert requests.TASK_ROUTES is routes.TASK_ROUTES
    # What each set held before the table (behaviour unchanged):
    assert RUNTIMES["mlx-lm"].routes == {"/v1/chat/completions", "/v1/completions"}
    assert RUNTIMES["mlx-vlm"].routes == {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
    assert RUNTIMES["llama-server"].routes == routes.ALL_ROUTES and len(routes.ALL_ROUTES) == 10
    assert routes.USAGE_ROUTES == {"/v1/chat/completions", "/v1/completions"}
    assert routes.REASONING_ROUTES == {"/v1/chat/completions", "/v1/responses"}
    assert routes.TASK_ROUTES == {"embedding": {"/v1/embeddings"}, "rerank": {"/v1/rerank", "/v1/reranking"}}
    assert list(routes.TASK_ROUTES) == ["embedding", "rerank"]  # task_refusal's order for a model with both
