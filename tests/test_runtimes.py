"""Launch specs and preset layering: pure functions, checked against the runtimes' real flags."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import write

from athanor.errors import RuntimeNotFoundError
from athanor.managers.jobs import model_job
from athanor.managers.process import ProcessManager
from athanor.runtimes.features import takes_unix_socket
from athanor.runtimes.launch import RUNTIMES, SOCKET_PATH_MAX, Target, find_runtime, launch_spec, socket_path
from athanor.runtimes.presets import (
    BUILTIN_RECIPES,
    PRESET_KEYS,
    RUNTIMES as RUNTIME_NAMES,
    check_preset_value,
    effective_preset,
    keys_for,
    parse_assignment,
    preset_argv,
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


def test_llama_server_skips_its_fit_pass_only_where_it_could_change_nothing():
    """llama-server's --fit loads the model a first time to shrink unset settings to the free memory. With the
    context and GPU layers given it cannot shrink anything, so athanor turns it off; with ``ctxSize: 0`` (the
    model's own context) it may shrink the context, so it stays on. The user's own choice wins."""
    target = Target("qwen", "llama-server", "/m/q.gguf")

    def env(preset: dict, spec_env: dict | None = None) -> dict:
        values = effective_preset("llama-server", context_length=8192, recipe=None, preset=preset)
        return launch_spec(target, values, 40900, "llama-server", extra_env=spec_env).env

    assert env({})["LLAMA_ARG_FIT"] == "off"
    assert env({"ctxSize": 4096, "gpuLayers": 0})["LLAMA_ARG_FIT"] == "off"
    assert "LLAMA_ARG_FIT" not in env({"ctxSize": 0})
    assert env({}, {"LLAMA_ARG_FIT": "on"})["LLAMA_ARG_FIT"] == "on"
    mlx = launch_spec(Target("t", "mlx-lm", "/snap"), effective_preset("mlx-lm", context_length=None, recipe=None,
                                                                       preset={}), 40901, "mlx_lm.server")
    assert "LLAMA_ARG_FIT" not in mlx.env


def test_the_installed_llama_server_reads_the_fit_variable():
    """A build that predates --fit ignores the variable (and would refuse the flag, hence a variable); the one
    setup builds must know it, or every start would pay the fit pass unseen."""
    help_text = subprocess.run([find_runtime("llama-server"), "--help"], check=True, capture_output=True,
                               text=True, timeout=60).stdout
    assert "(env: LLAMA_ARG_FIT)" in _help_entry(help_text, "--fit")


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
    """A recipe names the runtimes that have its knobs (mtp: llama-server only); every value is valid there."""
    for recipe in BUILTIN_RECIPES.values():
        assert recipe.values and set(recipe.values) <= set(RUNTIME_NAMES), recipe.name
        assert recipe.description and "\n" not in recipe.description, recipe.name
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
        off = PRESET_KEYS[key].off_flags.get("llama-server")
        if off:
            assert off + " " in help_text.replace(",", " ") + " ", key
    for flag in ("--model", "--alias", "--mmproj", "--host", "--port"):
        assert flag in help_text


def _help_entry(help_text: str, flag: str) -> str:
    """The lines --help prints for ``flag``: its row and the indented lines under it."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(rf"(^|[ ,]){re.escape(flag)}( |,|$)", line)
                 and not line.startswith(" "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def test_every_llama_server_choice_is_one_the_installed_server_lists():
    """Choice keys offer only the values llama-server's --help lists for that flag (spec types, reasoning formats,
    KV cache types, load modes), so a schema-valid value never fails at start."""
    help_text = subprocess.run([find_runtime("llama-server"), "--help"], check=True, capture_output=True,
                               text=True, timeout=60).stdout
    for name in keys_for("llama-server"):
        key = PRESET_KEYS[name]
        if key.kind != "choice":
            continue
        entry = _help_entry(help_text, key.flags["llama-server"])
        listed = set(re.findall(r"[\w.+-]+", entry))
        assert set(key.choices) <= listed, (name, set(key.choices) - listed)


def _argv(runtime: str, preset: dict) -> list[str]:
    return preset_argv(runtime, {k: v for k, v in effective_preset(runtime, context_length=None, recipe=None,
                                                                   preset=preset).items() if k in preset})


@pytest.mark.parametrize(("runtime", "preset", "expected"), [
    ("llama-server", {"specType": "draft-mtp"}, ["--spec-type", "draft-mtp"]),
    ("llama-server", {"draftMax": 8}, ["--spec-draft-n-max", "8"]),
    ("mlx-lm", {"draftMax": 4}, ["--num-draft-tokens", "4"]),
    ("llama-server", {"draftMin": 2}, ["--spec-draft-n-min", "2"]),
    ("llama-server", {"draftPMin": 0.75}, ["--spec-draft-p-min", "0.75"]),
    ("llama-server", {"draftGpuLayers": 99}, ["--spec-draft-ngl", "99"]),
    ("llama-server", {"reasoning": "off"}, ["--reasoning", "off"]),
    ("llama-server", {"reasoning": True}, ["--reasoning", "on"]),
    ("llama-server", {"reasoning": "auto"}, ["--reasoning", "auto"]),
    ("llama-server", {"reasoningFormat": "deepseek"}, ["--reasoning-format", "deepseek"]),
    ("llama-server", {"reasoningBudget": -1}, ["--reasoning-budget", "-1"]),
    ("llama-server", {"reasoningBudget": 2048}, ["--reasoning-budget", "2048"]),
    ("llama-server", {"jinja": True}, ["--jinja"]),
    ("llama-server", {"jinja": False}, ["--no-jinja"]),
    ("llama-server", {"chatTemplate": "chatml"}, ["--chat-template", "chatml"]),
    ("mlx-lm", {"chatTemplate": "{{ messages }}"}, ["--chat-template", "{{ messages }}"]),
    ("llama-server", {"chatTemplateFile": "/t/tmpl.jinja"}, ["--chat-template-file", "/t/tmpl.jinja"]),
    ("llama-server", {"cacheTypeK": "q8_0", "cacheTypeV": "q8_0", "flashAttn": "on"},
     ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--flash-attn", "on"]),
])
def test_new_keys_render_their_flags(runtime, preset, expected):
    assert _argv(runtime, preset) == expected


@pytest.mark.parametrize(("runtime", "name", "value", "problem"), [
    ("llama-server", "specType", "draft-bogus", "'draft-bogus' is not one of ['none', 'draft-simple'"),
    ("llama-server", "draftMax", 0, "0 is less than the minimum of 1"),
    ("llama-server", "draftMin", "two", "expected an integer, got 'two'"),
    ("llama-server", "draftPMin", 1.5, "1.5 is greater than the maximum of 1"),
    ("llama-server", "draftGpuLayers", -1, "-1 is less than the minimum of 0"),
    ("llama-server", "reasoning", "maybe", "expected on, off or auto, got 'maybe'"),
    ("llama-server", "reasoningFormat", "think",
     "'think' is not one of ['auto', 'none', 'deepseek', 'deepseek-legacy']"),
    ("llama-server", "reasoningBudget", -2, "-2 is less than the minimum of -1"),
    ("llama-server", "jinja", "yes", "expected true or false, got 'yes'"),
    ("llama-server", "chatTemplate", "", "expected a non-empty string, got ''"),
    ("mlx-lm", "chatTemplate", 3, "expected a non-empty string, got 3"),
    ("llama-server", "chatTemplateFile", "a\0b", "a value cannot contain a NUL character"),
    ("mlx-lm", "reasoning", "on", "unknown preset key 'reasoning' for mlx-lm"),
    ("mlx-lm", "specType", "draft-mtp", "unknown preset key 'specType' for mlx-lm"),
])
def test_new_keys_refuse_bad_values(runtime, name, value, problem):
    assert problem in (check_preset_value(runtime, name, value) or "")


def test_string_keys_take_the_command_line_value_as_written():
    assert parse_assignment("chatTemplateFile=/t/1.jinja") == ("chatTemplateFile", "/t/1.jinja")
    assert parse_assignment("chatTemplate={% for m in messages %}{{ m.content }}{% endfor %}") == (
        "chatTemplate", "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert parse_assignment("chatTemplate=123") == ("chatTemplate", "123")
    assert parse_assignment("jinja=false") == ("jinja", False)
    assert parse_assignment("reasoning=off") == ("reasoning", False)
    assert parse_assignment("reasoningBudget=-1") == ("reasoningBudget", -1)


@pytest.mark.parametrize(("recipe", "runtime", "expected"), [
    ("q8-kv", "llama-server", ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--flash-attn", "on"]),
    ("q8-kv", "mlx-lm", ["--kv-bits", "8"]),
    ("thinking", "llama-server", ["--reasoning", "on", "--reasoning-format", "deepseek", "--reasoning-budget", "-1",
                                  "--n-predict", "32768", "--temp", "0.6", "--top-p", "0.95", "--top-k", "20"]),
    ("thinking", "mlx-lm", ["--max-tokens", "32768", "--temp", "0.6", "--top-p", "0.95", "--top-k", "20"]),
    ("instruct", "llama-server", ["--reasoning", "off", "--temp", "0.7", "--top-p", "0.8", "--top-k", "20"]),
    ("instruct", "mlx-lm", ["--temp", "0.7", "--top-p", "0.8", "--top-k", "20"]),
    ("mtp", "llama-server", ["--spec-type", "draft-mtp", "--spec-draft-n-max", "3"]),
])
def test_new_recipes_render_their_flags(recipe, runtime, expected):
    values = effective_preset(runtime, context_length=None, recipe=BUILTIN_RECIPES[recipe], preset={})
    argv = preset_argv(runtime, {k: v for k, v in values.items() if v.source == f"recipe:{recipe}"})
    pairs = {(argv[i], argv[i + 1]) for i in range(len(argv) - 1)}
    for i in range(0, len(expected), 2):
        assert tuple(expected[i:i + 2]) in pairs, (recipe, expected[i:i + 2], argv)


def test_mtp_recipe_leaves_mlx_untouched():
    values = effective_preset("mlx-lm", context_length=None, recipe=BUILTIN_RECIPES["mtp"], preset={})
    assert not [k for k, v in values.items() if v.source == "recipe:mtp"]


def test_new_recipes_are_listed_by_the_cli(cli):
    table = cli("recipes")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:] if line.strip()}
    for name in ("q8-kv", "thinking", "instruct", "mtp"):
        assert name in rows and "built-in" in rows[name], table.stdout
        assert BUILTIN_RECIPES[name].description in rows[name]
    assert "MTP heads" in rows["mtp"]
    shown = cli("recipes", "thinking", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["values"]["llama-server"]["reasoningFormat"] == "deepseek"
    assert data["values"]["llama-server"]["reasoning"] == "on"


def _llama_launch(tmp_path, binary: str, port: int = 8101):
    return launch_spec(Target("m", "llama-server", str(tmp_path / "m.gguf")), {}, port, binary)


def test_the_embedded_supervisor_gives_llama_server_a_socket_beside_its_port(tmp_path):
    """The socket is the manager's decision (``prepared``) and reaches argv only in the job it spawns, so a launch
    is compared, recorded and parking-keyed alike under every manager."""
    launch = _llama_launch(tmp_path, find_runtime("llama-server"))
    prepared = ProcessManager(tmp_path / "logs", tmp_path / "run").prepared(launch)
    assert prepared.socket == str(tmp_path / "run" / "port-8101.sock")
    assert prepared == launch and prepared.argv == launch.argv
    job = model_job("m", prepared, tmp_path)
    at = job.argv.index("--host")
    assert job.argv[at + 1] == f"127.0.0.1,{prepared.socket}" and job.argv.count("--host") == 1
    assert job.socket == prepared.socket
    assert model_job("m", launch, tmp_path).argv == tuple(launch.argv)  # launchd and systemd: the port alone


def test_no_socket_where_it_could_not_work(tmp_path):
    mlx = launch_spec(Target("m", "mlx-lm", str(tmp_path / "m")), {}, 8102, sys.executable)
    assert ProcessManager(tmp_path / "logs", tmp_path / "run").prepared(mlx).socket is None  # mlx_lm.server cannot
    llama = _llama_launch(tmp_path, find_runtime("llama-server"))
    deep = tmp_path / ("d" * (SOCKET_PATH_MAX - len(str(tmp_path))))
    assert socket_path(deep, 8101) is None  # longer than sun_path takes: the port alone
    assert ProcessManager(tmp_path / "logs", deep).prepared(llama).socket is None
    assert ProcessManager(tmp_path / "logs").prepared(llama).socket is None  # no directory for sockets given


def test_an_older_llama_server_is_not_given_a_socket_and_an_upgraded_one_is(tmp_path):
    """A llama-server whose --host takes no socket path would exit at start on one; the binary's own help says,
    and is asked again once the file changes. A wrapper script is never run to ask."""
    real = find_runtime("llama-server")
    binary = tmp_path / "llama-server"
    shutil.copy(shutil.which("echo") or "/bin/echo", binary)  # a real executable whose help names no socket
    manager = ProcessManager(tmp_path / "logs", tmp_path / "run")
    assert not takes_unix_socket(str(binary))
    assert manager.prepared(_llama_launch(tmp_path, str(binary))).socket is None
    binary.unlink()
    binary.symlink_to(real)  # replaced by one that takes a socket
    assert takes_unix_socket(str(binary))
    assert manager.prepared(_llama_launch(tmp_path, str(binary))).socket is not None
    wrapper = write(tmp_path / "wrapper", f"#!/bin/sh\ntouch {shlex.quote(str(tmp_path / 'ran'))}\n"
                                          f"exec {shlex.quote(real)} \"$@\"\n")
    wrapper.chmod(0o755)
    assert not takes_unix_socket(str(wrapper)) and not (tmp_path / "ran").exists()
    assert manager.prepared(_llama_launch(tmp_path, str(wrapper))).socket is None
    assert not takes_unix_socket(str(tmp_path / "gone"))
