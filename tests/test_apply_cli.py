"""apply / diff / delete / get through the real `athanor` entry point, against a real HF cache layout."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import REPO, write
from fixtures.tiny_models import add_gguf_repo, add_mlx_repo, write_tiny_llama_gguf

GGUF_MODEL = """\
apiVersion: athanor.dev/v1alpha1
kind: Model
metadata:
  name: tiny
  labels: {family: llama, tier: small}
spec:
  runtime: llama-server
  source:
    hf: {repo: test-org/tiny-GGUF, file: tiny-llama-F32.gguf}
  aliases: [tiny-alias]
  recipe: coding
  preset:
    ctxSize: 128
"""

MLX_MODEL = """\
apiVersion: athanor.dev/v1alpha1
kind: Model
metadata:
  name: tiny-mlx
  labels: {family: llama}
spec:
  runtime: mlx-lm
  source:
    hf: {repo: mlx-community/tiny-llama-4bit}
"""

PATH_MODEL = """\
apiVersion: athanor.dev/v1alpha1
kind: Model
metadata:
  name: mine
spec:
  runtime: llama-server
  source:
    path: {path}
"""


def models_json(cli) -> dict:
    result = cli("get", "models", "-o", "json")
    assert result.returncode == 0, result.stderr
    return {item["metadata"]["name"]: item for item in json.loads(result.stdout)["items"]}


def test_example_specs_apply_dry_run_and_write_nothing(cli, home):
    result = cli("apply", "-f", "specs/", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "model/qwen3-8b created (dry run)" in result.stdout
    assert "recipe/agent created (dry run)" in result.stdout
    assert not (home / "models.json").exists()


def test_example_specs_carry_a_working_schema_modeline():
    for spec in (REPO / "specs").rglob("*.yaml"):
        first = spec.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), spec
        schema_path = (spec.parent / first.split("=", 1)[1]).resolve()
        assert schema_path == REPO / "schema" / "athanor.schema.json", spec


def test_typo_is_reported_with_file_line_column_and_path(cli, tmp_path):
    spec = write(tmp_path / "models.yaml", GGUF_MODEL.replace("runtime: llama-server", "runtime: llama"))
    result = cli("apply", "-f", str(spec))
    assert result.returncode != 0
    assert f"{spec}:7:3: spec.runtime: 'llama' is not one of ['llama-server', 'mlx-lm', 'mlx-vlm']" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_whole_float_where_an_integer_belongs_is_refused_once(cli, home, tmp_path):
    """JSON Schema counts 1048576.0 as an integer; the gateway's body limit is a count of bytes (the compiled hot
    path takes an int and nothing else). A preset's integers were checked before: one message per field."""
    gateway = "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: gateway}\nspec:\n  limits:\n"
    spec = write(tmp_path / "gateway.yaml", gateway + "    maxRequestBytes: 1048576.0\n")
    result = cli("apply", "-f", str(spec))
    assert result.returncode == 1
    assert result.stderr == f"{spec}:6:5: spec.limits.maxRequestBytes: expected integer, got number 1048576.0\n"
    assert not (home / "models.json").exists()
    assert cli("apply", "-f", str(write(spec, gateway + "    maxRequestBytes: 1048576\n"))).returncode == 0

    model = write(tmp_path / "models.yaml", GGUF_MODEL.replace("ctxSize: 128", "ctxSize: 128.0"))
    result = cli("apply", "-f", str(model))
    assert result.returncode == 1
    assert result.stderr.count("spec.preset.ctxSize") == 1, result.stderr


def test_every_error_of_every_file_is_reported_and_nothing_is_written(cli, home, tmp_path):
    write(tmp_path / "specs" / "a.yaml", GGUF_MODEL.replace("recipe: coding", "recipe: codng"))
    write(tmp_path / "specs" / "nested" / "b.yml", MLX_MODEL.replace("kind: Model", "kind: Model\nbogus: 1"))
    write(tmp_path / "specs" / "c.yaml", MLX_MODEL.replace("name: tiny-mlx", "name: good"))
    result = cli("apply", "-f", str(tmp_path / "specs"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(line.endswith("spec.recipe: unknown recipe 'codng' (known: balanced, coding, fast, instruct, "
                           "long-context, mtp, q8-kv, quality, thinking)")
               and "a.yaml:11:3" in line for line in lines), lines
    assert any("nested/b.yml:3:1: bogus: unknown field" in line for line in lines), lines
    assert not (home / "models.json").exists(), "an apply with an invalid document must write nothing"


def test_duplicate_names_and_duplicate_keys_are_rejected(cli, tmp_path):
    text = GGUF_MODEL + "---\n" + GGUF_MODEL.replace("  recipe: coding\n", "  recipe: coding\n  recipe: fast\n")
    result = cli("apply", "-f", str(write(tmp_path / "dup.yaml", text)))
    assert result.returncode == 1
    assert "dup.yaml:18:3: metadata.name: duplicate Model 'tiny' (first at" in result.stderr
    assert "dup.yaml:26:3: spec.recipe: duplicate key (first at line 25)" in result.stderr


def test_apply_from_stdin(cli, home):
    result = cli("apply", "-f", "-", input=MLX_MODEL)
    assert result.returncode == 0, result.stderr
    assert "model/tiny-mlx created" in result.stdout
    assert "tiny-mlx" in json.loads((home / "models.json").read_text())["models"]


def test_scan_registers_gguf_and_mlx_with_the_right_runtime(cli, hf_root):
    add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    add_mlx_repo(hf_root, "mlx-community/tiny-llama-4bit", quantized_bits=4)
    result = cli("scan")
    assert result.returncode == 0, result.stderr
    models = models_json(cli)
    by_source = {json.dumps(m["spec"]["source"], sort_keys=True): m for m in models.values()}
    gguf = by_source[json.dumps({"hf": {"file": "tiny-llama-F32.gguf", "repo": "test-org/tiny-GGUF"}}, sort_keys=True)]
    mlx = by_source[json.dumps({"hf": {"repo": "mlx-community/tiny-llama-4bit"}}, sort_keys=True)]
    assert gguf["spec"]["runtime"] == "llama-server"
    assert gguf["metadata"]["name"] == "tiny-llama-f32"
    assert gguf["status"]["artifact"]["metadata"]["architecture"] == "llama"
    assert mlx["spec"]["runtime"] == "mlx-lm"
    assert mlx["metadata"]["name"] == "tiny-llama-4bit"
    assert mlx["status"]["artifact"]["metadata"]["quantization"] == "4bit"
    assert gguf["spec"]["port"] != mlx["spec"]["port"]
    assert all(m["metadata"]["annotations"]["athanor.dev/discovered"] == "true" for m in models.values())


def test_user_preset_port_alias_and_flavor_survive_rescan(cli, hf_root):
    gguf = add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    add_mlx_repo(hf_root, "mlx-community/tiny-llama-4bit", quantized_bits=4)
    assert cli("scan").returncode == 0
    before = models_json(cli)
    assert cli("preset", "set", "tiny-llama-f32", "ctxSize=512", "flashAttn=off").returncode == 0
    assert cli("flavor", "tiny-llama-4bit", "vlm").returncode == 0
    # The file changes on disk (a new revision of the same repo): only detected facts may follow.
    gguf.unlink()
    add_gguf_repo(hf_root, "test-org/tiny-GGUF", context_length=512)
    assert cli("scan").returncode == 0
    after = models_json(cli)
    tiny = after["tiny-llama-f32"]
    assert tiny["spec"]["preset"] == {"ctxSize": 512, "flashAttn": False}
    assert tiny["spec"]["port"] == before["tiny-llama-f32"]["spec"]["port"]
    assert tiny["status"]["artifact"]["metadata"]["contextLength"] == 512
    assert after["tiny-llama-4bit"]["spec"]["runtime"] == "mlx-vlm"
    assert after["tiny-llama-4bit"]["spec"]["port"] == before["tiny-llama-4bit"]["spec"]["port"]


def test_applying_a_spec_adopts_the_discovered_model_keeping_its_port(cli, hf_root, tmp_path):
    add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    assert cli("scan").returncode == 0
    port = models_json(cli)["tiny-llama-f32"]["spec"]["port"]
    result = cli("apply", "-f", str(write(tmp_path / "m.yaml", GGUF_MODEL)))
    assert "model/tiny adopted" in result.stdout, result.stdout + result.stderr
    models = models_json(cli)
    assert set(models) == {"tiny"}, "the discovered entry is taken over, not duplicated"
    assert models["tiny"]["spec"]["port"] == port
    assert models["tiny"]["status"]["conditions"][0] == {
        **models["tiny"]["status"]["conditions"][0], "type": "Available", "status": "True"}
    assert cli("scan").returncode == 0
    assert set(models_json(cli)) == {"tiny"}, "a rescan must not rediscover an adopted model"


def test_diff_exit_codes(cli, tmp_path):
    spec = write(tmp_path / "m.yaml", GGUF_MODEL)
    first = cli("diff", "-f", str(spec))
    assert first.returncode == 1 and "+++ model/tiny (applied)" in first.stdout
    assert cli("apply", "-f", str(spec)).returncode == 0
    same = cli("diff", "-f", str(spec))
    assert (same.returncode, same.stdout) == (0, "")
    write(spec, GGUF_MODEL.replace("ctxSize: 128", "ctxSize: 256"))
    changed = cli("diff", "-f", str(spec))
    assert changed.returncode == 1
    assert "-    ctxSize: 128\n+    ctxSize: 256" in changed.stdout
    broken = cli("diff", "-f", str(write(tmp_path / "bad.yaml", "kind: [")))
    assert broken.returncode == 2 and "YAML syntax error" in broken.stderr


def test_removing_a_field_from_the_spec_removes_it_but_keeps_imperative_changes(cli, tmp_path):
    spec = write(tmp_path / "m.yaml", GGUF_MODEL)
    assert cli("apply", "-f", str(spec)).returncode == 0
    assert cli("preset", "set", "tiny", "threads=2").returncode == 0
    write(spec, GGUF_MODEL.replace("  aliases: [tiny-alias]\n", "").replace("ctxSize: 128", "batchSize: 64"))
    assert cli("apply", "-f", str(spec)).returncode == 0
    model = models_json(cli)["tiny"]
    assert "aliases" not in model["spec"]
    assert model["spec"]["preset"] == {"threads": 2, "batchSize": 64}
    assert model["metadata"]["generation"] == 3  # created, preset set, apply


def test_get_selectors_and_output_formats(cli, tmp_path):
    assert cli("apply", "-f", str(write(tmp_path / "a.yaml", GGUF_MODEL + "---\n" + MLX_MODEL))).returncode == 0
    assert cli("get", "models", "-o", "name", "-l", "tier=small").stdout.split() == ["model/tiny"]
    assert cli("get", "models", "-o", "name", "-l", "family=llama,tier!=small").stdout.split() == ["model/tiny-mlx"]
    assert cli("get", "models", "-o", "name", "-l", "tier").stdout.split() == ["model/tiny"]
    one = yaml.safe_load(cli("get", "models", "tiny-alias", "-o", "yaml").stdout)
    assert one["metadata"]["name"] == "tiny" and one["status"]["phase"] == "Standby"
    table = cli("get", "models").stdout.splitlines()
    assert table[0].split() == ["NAME", "RUNTIME", "STATUS", "PORT", "SIZE", "AGE"]
    assert [line.split()[0] for line in table[1:]] == ["tiny", "tiny-mlx"]
    assert table[1].index("llama-server") == table[0].index("RUNTIME"), "columns are aligned"
    wide = cli("get", "models", "-o", "wide").stdout.splitlines()
    assert "test-org/tiny-GGUF:tiny-llama-F32.gguf" in wide[1]


def test_prune_removes_applied_models_only(cli, hf_root, tmp_path):
    add_gguf_repo(hf_root, "other/tiny2-GGUF", filename="other.gguf")
    both = write(tmp_path / "both.yaml", GGUF_MODEL + "---\n" + MLX_MODEL)
    assert cli("apply", "-f", str(both)).returncode == 0
    only = write(tmp_path / "only.yaml", MLX_MODEL)
    result = cli("apply", "-f", str(only), "--prune")
    assert "model/tiny pruned" in result.stdout
    assert set(models_json(cli)) == {"tiny-mlx", "other"}, "the discovered model stays"


def test_delete_by_name_and_by_file(cli, hf_root, tmp_path):
    add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    spec = write(tmp_path / "m.yaml", MLX_MODEL)
    assert cli("apply", "-f", str(spec)).returncode == 0
    assert cli("delete", "-f", str(spec)).stdout.strip() == "model/tiny-mlx deleted"
    assert cli("delete", "model", "tiny-llama-f32").returncode == 0
    assert cli("scan").returncode == 0
    assert models_json(cli) == {}, "a deleted discovered model is not rediscovered"
    missing = cli("delete", "model", "nope")
    assert missing.returncode == 1 and missing.stderr.strip() == "athanor: model 'nope' not found; see 'athanor get models'"
    assert (Path(hf_root) / "hub").exists(), "files on disk are never touched"


def test_describe_shows_provenance_argv_and_events(cli, hf_root, tmp_path):
    add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", GGUF_MODEL))).returncode == 0
    out = cli("describe", "model", "tiny").stdout
    assert "ctxSize         128     model" in out
    assert "temperature     0.2     recipe:coding" in out
    assert "gpuLayers       999     default" in out
    assert "--alias tiny" in out and "--ctx-size 128" in out and "--host 127.0.0.1" in out
    assert "Adopted" in out or "Created" in out
    assert any(line.split()[:2] == ["Available", "True"] for line in out.splitlines())


def _found(model: dict) -> str:
    """The Available condition's reason: Found, or NotFound when the weights are not where the spec says."""
    return model["status"]["conditions"][0]["reason"]


def test_relative_source_path_is_relative_to_the_spec_file(cli, tmp_path):
    tmp_path = tmp_path.resolve()  # the child's getcwd() is the physical path
    gguf = write_tiny_llama_gguf(tmp_path / "specs" / "sub" / "smol.gguf")
    spec = write(tmp_path / "specs" / "models.yaml", PATH_MODEL.format(path="sub/smol.gguf"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dry = cli("apply", "-f", str(spec), "--dry-run", cwd=elsewhere)
    assert dry.stdout == "model/mine created (dry run)\n", dry.stdout + dry.stderr
    assert cli("apply", "-f", str(spec), cwd=elsewhere).returncode == 0
    model = models_json(cli)["mine"]
    assert model["spec"]["source"] == {"path": str(gguf)}
    assert (_found(model), model["status"]["phase"]) == ("Found", "Standby")
    # The same file named relatively from its own directory means the same model: nothing to change.
    again = cli("apply", "-f", "models.yaml", cwd=tmp_path / "specs")
    assert again.stdout == "model/mine unchanged\n", again.stdout + again.stderr
    for where in (elsewhere, tmp_path / "specs"):
        same = cli("diff", "-f", str(spec), cwd=where)
        assert (same.returncode, same.stdout) == (0, ""), same.stderr


def test_relative_source_path_from_stdin_is_relative_to_the_working_directory(cli, tmp_path):
    work = tmp_path.resolve() / "work"
    gguf = write_tiny_llama_gguf(work / "models" / "smol.gguf")
    text = PATH_MODEL.format(path="models/smol.gguf")
    assert cli("apply", "-f", "-", input=text, cwd=work).returncode == 0
    model = models_json(cli)["mine"]
    assert model["spec"]["source"] == {"path": str(gguf)}
    assert _found(model) == "Found"
    same = cli("diff", "-f", "-", input=text, cwd=work)
    assert (same.returncode, same.stdout) == (0, ""), same.stderr
    moved = cli("diff", "-f", "-", input=text, cwd=tmp_path)
    assert moved.returncode == 1 and f"+    path: {tmp_path.resolve() / 'models' / 'smol.gguf'}" in moved.stdout


def test_tilde_source_path_is_stored_expanded_and_diffs_clean(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    gguf = write_tiny_llama_gguf(tmp_path / "user" / "models" / "smol.gguf")
    spec = write(tmp_path / "m.yaml", PATH_MODEL.format(path="~/models/smol.gguf"))
    assert cli("apply", "-f", str(spec)).returncode == 0
    model = models_json(cli)["mine"]
    assert model["spec"]["source"] == {"path": str(gguf)}
    assert _found(model) == "Found"
    assert cli("apply", "-f", str(spec)).stdout == "model/mine unchanged\n"
    assert cli("diff", "-f", str(spec)).returncode == 0


def test_relative_source_path_adopts_the_discovered_loose_file(cli, tmp_path):
    tmp_path = tmp_path.resolve()
    write_tiny_llama_gguf(tmp_path / "specs" / "sub" / "smol.gguf")
    assert cli("scan", "--path", str(tmp_path / "specs" / "sub")).returncode == 0
    port = models_json(cli)["smol"]["spec"]["port"]
    spec = write(tmp_path / "specs" / "models.yaml", PATH_MODEL.format(path="sub/smol.gguf"))
    diff = cli("diff", "-f", str(spec))
    assert diff.returncode == 1 and "--- model/mine (live)" in diff.stdout
    assert cli("apply", "-f", str(spec)).stdout == "model/mine adopted\n"
    models = models_json(cli)
    assert set(models) == {"mine"} and models["mine"]["spec"]["port"] == port
