"""Starter suggestions: the tier a machine's memory reaches, and the empty registry's advice."""

from __future__ import annotations

import psutil

from athanor.hub.starters import GIB, TIERS, suggestions, tier_for


def test_tiers_follow_total_memory():
    assert [tier_for(size * GIB) for size in (8, 16, 24, 32, 64, 192)] == [
        "8 GB", "16 GB", "16 GB", "32 GB+", "64 GB+", "64 GB+"]


def test_mlx_starters_only_where_mlx_runs():
    tier, with_mlx = suggestions(16 * GIB, mlx=True)
    _, without = suggestions(16 * GIB, mlx=False)
    assert tier == "16 GB" and any(s.mlx for s in with_mlx) and not any(s.mlx for s in without)
    assert all(s.pull.startswith("athanor pull ") for s in with_mlx)
    gguf = next(s for s in without if not s.mlx)
    assert gguf.pull == f"athanor pull {gguf.repo} --file {gguf.file}" and gguf.file.endswith(".gguf")


def test_every_tier_has_a_gguf_starter():
    for name, _, starters in TIERS:
        assert any(not s.mlx for s in starters), name


def test_an_empty_registry_suggests_what_fits_this_machine(cli, home):
    result = cli("get", "models")
    assert result.returncode == 0
    tier, picks = suggestions(psutil.virtual_memory().total)
    assert f"({tier} tier)" in result.stderr
    for starter in picks:
        assert starter.pull in result.stderr
