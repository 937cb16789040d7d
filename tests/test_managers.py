"""Which service manager runs what: the choice for auto, for install, and for a handle."""

from __future__ import annotations

import platform

import pytest

from athanor.managers import UNDER_ENV, Managers, installed_manager, resolve_manager, systemd_user_available


def test_auto_runs_models_under_the_manager_the_gateway_runs_under():
    assert resolve_manager("auto", {}) == "process", "a gateway started by hand: the embedded supervisor"
    assert resolve_manager("auto", {UNDER_ENV: "launchd"}) == "launchd"
    assert resolve_manager("auto", {UNDER_ENV: "nonsense"}) == "process"
    assert resolve_manager("systemd", {UNDER_ENV: "launchd"}) == "systemd", "an explicit choice wins"


@pytest.mark.skipif(platform.system() != "Linux", reason="the Linux half of the install choice")
def test_install_picks_systemd_only_when_a_user_manager_answers(systemctl):
    assert systemd_user_available() and installed_manager() == "systemd"


@pytest.mark.skipif(platform.system() != "Linux", reason="the Linux half of the install choice")
def test_install_falls_back_to_the_embedded_supervisor_without_a_user_manager(tmp_path, monkeypatch):
    # The real systemctl, with no user bus to reach (as in a container, or without a login session).
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert not systemd_user_available() and installed_manager() == "process"


def test_a_handle_goes_back_to_the_manager_that_made_it(tmp_path):
    managers = Managers(tmp_path)
    gateway = {"serviceManager": "process", "launchd": {"agentsDir": str(tmp_path / "agents")}}
    assert managers.of({"manager": "launchd", "label": "x"}, gateway).name == "launchd"
    assert managers.of({"pid": 1}, gateway).name == "process", "handles from before managers existed"
    with pytest.raises(ValueError, match="unknown manager"):
        managers.of({"manager": "upstart"}, gateway)
    assert managers.get("launchd", gateway) is managers.get("launchd", gateway), "made once"
