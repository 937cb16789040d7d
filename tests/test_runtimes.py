"""Launch specs and preset layering: pure functions, checked against the runtimes' real flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from athanor.errors import RuntimeNotFoundError
from athanor.runtimes.launch import RUNTIMES, Target, find_runtime, launch_spec
from athanor.runtimes.presets import (
    BUILTIN_RECIPES,
    PRESET_KEYS,
    RUNTIMES as RUNTIME_NAMES,
    check_preset_value,
    effective_preset,
    keys_for,
    parse_assignment,
)
from athanor.spec.validate import schema


def test_layering_records_where_each_value_comes_from():
    values = effective_preset(
        "llama-server", context_length=4096, recipe=BUILTIN_RECIPES["fast"], preset={"ctxSize": 2048, "threads": 3}
    )
    assert values["ctxSize"].value == 2048 and values["ctxSize"].source == "model"
    assert values["cacheTypeK"].value == "q8_0" and values["cacheTypeK"].source == "recipe:fast"
    assert values["gpuLayers"].value == 999 and values["gpuLayers"].source == "default"
    assert values["threads"].source == "model"


def test_default_context_follows_the_model_but_is_capped():
    small = effective_preset("llama-server", context_length=256, recipe=None, preset={})
    huge = effective_preset("llama-server", context_length=1_000_000, recipe=None, preset={})
    assert small["ctxSize"].value == 256
    assert huge["ctxSize"].value == 32768


def test_llama_server_argv():
    target = Target("qwen", "llama-server", "/m/q.gguf", mmproj="/m/mmproj.gguf")
    preset = effective_preset("llama-server", context_length=None, recipe=None,
                              preset={"flashAttn": True, "loadMode": "mlock", "temperature": 0.5})
    spec = launch_spec(target, preset, 40900, "/usr/bin/llama-server")
    assert spec.argv[:10] == ["/usr/bin/llama-server", "--model", "/m/q.gguf", "--alias", "qwen", "--mmproj",
                              "/m/mmproj.gguf", "--host", "127.0.0.1", "--port"]
    assert spec.argv[10] == "40900"
    tail = spec.argv[11:]
    assert ["--flash-attn", "on"] == tail[tail.index("--flash-attn"):tail.index("--flash-attn") + 2]
    assert tail[tail.index("--load-mode") + 1] == "mlock"
    assert tail[tail.index("--temp") + 1] == "0.5"
    assert spec.served_model == "qwen" and spec.health_path == "/health"


def test_mlx_argv_is_offline_and_serves_the_path():
    target = Target("tiny", "mlx-lm", "/snap/abc")
    preset = effective_preset("mlx-lm", context_length=None, recipe=BUILTIN_RECIPES["coding"], preset={})
    spec = launch_spec(target, preset, 40901, "mlx_lm.server")
    assert spec.argv[:7] == ["mlx_lm.server", "--model", "/snap/abc", "--host", "127.0.0.1", "--port", "40901"]
    assert spec.env["HF_HUB_OFFLINE"] == "1"
    assert spec.served_model == "/snap/abc"
    assert spec.argv[spec.argv.index("--max-tokens") + 1] == "8192"


def test_every_mlx_lm_flag_exists_in_the_installed_server():
    """The flags athanor renders for mlx-lm are ones the real mlx_lm.server accepts."""
    help_text = subprocess.run([sys.executable, "-m", "mlx_lm.server", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for key in keys_for("mlx-lm"):
        assert PRESET_KEYS[key].flags["mlx-lm"] in help_text, key


def test_unknown_and_wrongly_typed_keys_name_the_valid_ones():
    problem = check_preset_value("mlx-lm", "ctxSize", 10)
    assert problem and "unknown preset key 'ctxSize' for mlx-lm" in problem and "prefillStepSize" in problem
    assert check_preset_value("llama-server", "ctxSize", "big") == "expected an integer, got 'big'"
    assert check_preset_value("llama-server", "topP", 2) == "2 is greater than the maximum of 1"
    assert check_preset_value("llama-server", "flashAttn", "maybe") == "expected on, off or auto, got 'maybe'"
    assert check_preset_value("llama-server", "ctxSize", True) is not None


def test_command_line_assignments_are_typed():
    assert parse_assignment("ctxSize=8192") == ("ctxSize", 8192)
    assert parse_assignment("flashAttn=on") == ("flashAttn", True)
    assert parse_assignment("cacheTypeK=q8_0") == ("cacheTypeK", "q8_0")
    assert parse_assignment("temperature=0.7") == ("temperature", 0.7)


def test_builtin_recipes_only_use_keys_their_runtime_knows():
    for recipe in BUILTIN_RECIPES.values():
        assert set(recipe.values) == set(RUNTIME_NAMES), recipe.name
        for runtime, values in recipe.values.items():
            for key, value in values.items():
                assert check_preset_value(runtime, key, value) is None, (recipe.name, runtime, key)


def test_schema_preset_matches_the_key_table():
    """The schema editors read and the table the code reads must not drift apart."""
    props = schema()["$defs"]["preset"]["properties"]
    assert props == {name: key.json_schema() for name, key in PRESET_KEYS.items()}, (
        "schema/athanor.schema.json is out of date with athanor/runtimes/presets.py"
    )


def test_missing_runtime_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(RuntimeNotFoundError, match=r"mlx-vlm: mlx_vlm.server not found on PATH; install it with: "):
        find_runtime("mlx-vlm")
    with pytest.raises(RuntimeNotFoundError, match="is not an executable file"):
        find_runtime("mlx-lm", str(tmp_path / "nope"))


def test_configured_runtime_path_wins(tmp_path):
    exe = tmp_path / "my-llama"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert find_runtime("llama-server", str(exe)) == str(exe)
    assert set(RUNTIMES) == set(RUNTIME_NAMES)


def test_every_llama_server_flag_exists_in_the_installed_server():
    """The flags athanor renders for llama-server are ones the real binary (built by setup) accepts."""
    binary = find_runtime("llama-server")
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout
    for key in keys_for("llama-server"):
        assert PRESET_KEYS[key].flags["llama-server"] + " " in help_text.replace(",", " "), key
    for flag in ("--model", "--alias", "--mmproj", "--host", "--port"):
        assert flag in help_text
