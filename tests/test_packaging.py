"""The wheel carries the schema, templates and example specs, so an install outside the repo works."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_ships_data_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("athanor_gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "athanor/_data/schema/athanor.schema.json" in names
    assert "athanor/_data/specs/gateway.yaml" in names
    for template in ("plists/model.plist.j2", "plists/ingress.plist.j2", "systemd/model.service.j2",
                     "systemd/ingress.service.j2"):
        assert f"athanor/_data/templates/{template}" in names
    assert "athanor/cli/main.py" in names
