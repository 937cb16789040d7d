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
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("a, b", [("athanor.cli.install_cmds", "athanor.cli.serve_cmds"),
                                  ("athanor.doctor.context", "athanor.doctor.runtimes")])
def test_these_modules_do_not_import_each_other(a, b):
    assert not (b in _imports(a) and a in _imports(b)), f"{a} and {b} import each other"


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
