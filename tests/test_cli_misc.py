"""CLI habits: help everywhere, completion, one-line errors, light start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from athanor.cli.main import COMMANDS
from conftest import ATHANOR, write
from test_apply_cli import GGUF_MODEL, MLX_MODEL


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(cli, command):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: athanor " + command)


def test_version(cli):
    assert cli("version").stdout.startswith("athanor 0.")


def test_start_up_imports_no_heavy_modules():
    # athanor.native is light, but importing it means checking the compiled hot path's stamp (about 100 file stats
    # and six hashes), which only the gateway needs
    code = ("import sys; from athanor.cli.main import cli; "
            "from athanor.cli import get_cmds, spec_cmds, model_cmds, admin_client; "
            "heavy = {'aiohttp', 'jinja2', 'textual', 'huggingface_hub', 'jsonschema', 'psutil', 'athanor.native'} "
            "& set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_shell_completion_lists_commands_and_model_names(cli, tmp_path):
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", GGUF_MODEL))).returncode == 0
    env = {**os.environ, "_ATHANOR_COMPLETE": "bash_complete", "COMP_WORDS": "athanor de", "COMP_CWORD": "1"}
    out = subprocess.run([ATHANOR], env=env, capture_output=True, text=True).stdout
    assert "plain,delete" in out and "plain,describe" in out
    env.update(COMP_WORDS="athanor describe model ti", COMP_CWORD="3")
    assert "plain,tiny" in subprocess.run([ATHANOR], env=env, capture_output=True, text=True).stdout
    assert "_athanor_completion" in cli("completion", "bash").stdout


def test_errors_are_one_line_without_traceback(cli):
    for args in (["get", "models", "nope"], ["preset", "set", "nope", "x=1"], ["apply", "-f", "/no/such/file"]):
        result = cli(*args)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    usage = cli("get", "pods")
    assert usage.returncode == 2 and "Invalid value for 'RESOURCE'" in usage.stderr


def test_no_color_is_honoured(cli, tmp_path):
    spec = write(tmp_path / "m.yaml", GGUF_MODEL)
    out = cli("apply", "-f", str(spec), "--dry-run").stdout
    assert "\x1b[" not in out


def test_preset_set_show_unset(cli, tmp_path):
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", GGUF_MODEL))).returncode == 0
    bad = cli("preset", "set", "tiny", "prefillStepSize=5")
    assert bad.returncode == 1 and "unknown preset key 'prefillStepSize' for llama-server (valid:" in bad.stderr
    assert cli("preset", "set", "tiny", "ctxSize=1024", "cacheTypeK=q8_0").returncode == 0
    shown = json.loads(cli("preset", "show", "tiny", "-o", "json").stdout)
    assert shown["ctxSize"] == {"value": 1024, "from": "model"}
    assert shown["temperature"] == {"value": 0.2, "from": "recipe:coding"}
    assert cli("preset", "unset", "tiny", "ctxSize").returncode == 0
    shown = json.loads(cli("preset", "show", "tiny", "-o", "json").stdout)
    assert shown["ctxSize"]["from"] == "recipe:coding"
    missing = cli("preset", "unset", "tiny", "ctxSize")
    assert missing.returncode == 1 and "not set on tiny: ctxSize" in missing.stderr


def test_flavor_only_for_mlx(cli, tmp_path):
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", GGUF_MODEL + "---\n" + MLX_MODEL))).returncode == 0
    gguf = cli("flavor", "tiny", "vlm")
    assert gguf.returncode == 1 and "flavor applies to MLX models" in gguf.stderr
    assert cli("flavor", "tiny-mlx", "vlm").stdout.strip() == "model/tiny-mlx configured"
    assert cli("flavor", "tiny-mlx", "vlm").stdout.strip() == "model/tiny-mlx unchanged"


def test_gateway_and_recipes(cli, tmp_path):
    table = cli("get", "gateway").stdout
    assert "127.0.0.1:8080" in table and "no (defaults)" in table
    assert cli("apply", "-f", "specs/gateway.yaml", "-f", "specs/recipes/agent.yaml").returncode == 0
    gw = json.loads(cli("get", "gateway", "-o", "json").stdout)
    assert gw["spec"]["residency"] == {"policy": "single"} and gw["metadata"]["name"] == "default"
    names = cli("recipes", "-o", "name").stdout.split()
    from athanor.runtimes.presets import BUILTIN_RECIPES

    assert names == [f"recipe/{name}" for name in BUILTIN_RECIPES] + ["recipe/agent"], "built-in first, then user"
    model = GGUF_MODEL.replace("recipe: coding", "recipe: agent")
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", model))).returncode == 0
    in_use = cli("delete", "recipe", "agent")
    assert in_use.returncode == 1 and "used by tiny" in in_use.stderr
