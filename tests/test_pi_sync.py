"""``athanor sync pi`` and ``athanor snippet`` through the real entry point, and pi itself against the gateway.

pi is the npm package @mariozechner/pi-coding-agent; ``scripts/setup.sh --test`` installs the pinned version into
``.venv/pi``. The tests that run pi skip, saying so, where it is not installed (and fail under CI, which installs
it).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write
from fixtures.tiny_models import add_gguf_repo, add_mlx_repo, make_hf_cache, write_tiny_llama_gguf, write_tiny_mlx_llama
from fixtures.serving import Gateway, apply_models, model_spec, write_gateway

PI_FLAGS = ("--no-tools", "--no-session", "--no-context-files", "--no-extensions", "--no-skills",
            "--no-prompt-templates", "--offline")


@pytest.fixture
def pi_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pi's agent directory for this test, where both athanor and pi look (PI_CODING_AGENT_DIR)."""
    directory = tmp_path / "pi-agent"
    monkeypatch.setenv("PI_CODING_AGENT_DIR", str(directory))
    return directory


def pi_models(pi_dir: Path) -> dict:
    return json.loads((pi_dir / "models.json").read_text())


def athanor_models(pi_dir: Path) -> dict[str, dict]:
    return {m["id"]: m for m in pi_models(pi_dir)["providers"]["athanor"]["models"]}


def gateway_doc(lines: str) -> str:
    return "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: default}\nspec:\n" + lines


def apply(cli, path: Path, *docs: str):
    result = cli("apply", "-f", str(write(path, "---\n".join(docs))))
    assert result.returncode == 0, result.stderr
    return result


def sync(cli, *args: str):
    result = cli("sync", "pi", *args)
    assert result.returncode == 0, result.stderr
    return result


# ------------------------------------------------------------------------------------------ the file pi reads

FOREIGN = {
    "$schema": "https://example.invalid/pi-models.json",
    "providers": {
        "ollama": {"baseUrl": "http://localhost:11434/v1", "api": "openai-completions", "apiKey": "ollama",
                   "compat": {"supportsDeveloperRole": False},
                   "models": [{"id": "llama3.1:8b", "contextWindow": 128000,
                               "cost": {"input": 0.5, "output": 1e-07, "cacheRead": 0, "cacheWrite": 0}}]},
        "athanor": {"baseUrl": "http://old:1/v1", "api": "openai-completions", "apiKey": "x",
                    "models": [{"id": "gone"}]},
        "anthropic": {"baseUrl": "https://proxy.example.invalid/v1"},
    },
    "notes": ["kept", {"nested": None, "unicode": "déjà vu ✓", "big": 12345678901234567890}],
}


def test_sync_rewrites_only_its_provider_keeping_the_rest_and_the_mode(cli, home, pi_dir, tmp_path):
    apply(cli, tmp_path / "m.yaml", model_spec("tiny", write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")))
    path = write(pi_dir / "models.json", json.dumps(FOREIGN, indent=4, ensure_ascii=False))
    path.chmod(0o640)

    result = sync(cli)
    assert "provider/athanor updated" in result.stdout
    assert "model/tiny added" in result.stdout and "model/gone removed" in result.stdout
    assert f"pi: 1 added, 1 removed, 0 updated, 0 unchanged; wrote {path}" in result.stdout
    data = pi_models(pi_dir)
    provider = data["providers"].pop("athanor")
    expected = json.loads(json.dumps(FOREIGN))
    del expected["providers"]["athanor"]
    assert data == expected
    assert list(data) == list(FOREIGN) and list(data["providers"]) == ["ollama", "anthropic"]
    assert provider["baseUrl"] == "http://127.0.0.1:8080/v1" and provider["api"] == "openai-completions"
    assert provider["apiKey"] == "athanor"
    assert [m["id"] for m in provider["models"]] == ["tiny"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in pi_dir.iterdir()] == ["models.json"], "no temp file, no lock file in pi's directory"

    before = path.stat().st_mtime_ns
    again = sync(cli)
    assert f"pi: 0 added, 0 removed, 0 updated, 1 unchanged; already up to date: {path}" in again.stdout
    assert path.stat().st_mtime_ns == before, "an unchanged provider is not rewritten"


def test_a_new_file_is_private_and_a_symlinked_one_stays_a_symlink(cli, home, pi_dir, tmp_path):
    apply(cli, tmp_path / "m.yaml", model_spec("tiny", write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")))
    sync(cli)
    assert stat.S_IMODE((pi_dir / "models.json").stat().st_mode) == 0o600

    dotfile = write(tmp_path / "dotfiles" / "pi-models.json", json.dumps({"providers": {}}))
    (pi_dir / "models.json").unlink()
    (pi_dir / "models.json").symlink_to(dotfile)
    sync(cli)
    assert (pi_dir / "models.json").is_symlink()
    assert list(json.loads(dotfile.read_text())["providers"]) == ["athanor"]


def test_dry_run_writes_nothing(cli, home, pi_dir, tmp_path):
    apply(cli, tmp_path / "m.yaml", model_spec("tiny", write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")))
    result = sync(cli, "--dry-run")
    assert "provider/athanor created (dry run)" in result.stdout and "model/tiny added (dry run)" in result.stdout
    assert "not written (dry run)" in result.stdout
    assert not pi_dir.exists()

    elsewhere = tmp_path / "other-pi"
    result = sync(cli, "--dir", str(elsewhere))
    assert f"wrote {elsewhere / 'models.json'}" in result.stdout
    assert list(athanor_models(elsewhere)) == ["tiny"]
    assert not pi_dir.exists()


@pytest.mark.parametrize("text, error", [
    ('{"providers": {"ollama": {"apiKey": "x",}}}',
     ":1:41: not valid JSON (Expecting property name enclosed in double quotes); left untouched"),
    ('{\n  // mine\n  "providers": {}\n}', ":2:3: not valid JSON"),
    ('[{"providers": {}}]', ": expected a JSON object at the top level; left untouched"),
    ('{"providers": []}', ": 'providers' must be a JSON object; left untouched"),
])
def test_a_file_that_is_not_plain_json_is_refused_and_left_as_it_was(cli, home, pi_dir, tmp_path, text, error):
    apply(cli, tmp_path / "m.yaml", model_spec("tiny", write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")))
    path = write(pi_dir / "models.json", text)
    before = path.stat()
    for args in ((), ("--dry-run",)):
        result = cli("sync", "pi", *args)
        assert result.returncode == 1
        assert f"{path}{error}" in result.stderr
        assert "Traceback" not in result.stderr
    assert path.read_text() == text and path.stat().st_mtime_ns == before.st_mtime_ns
    assert [p.name for p in pi_dir.iterdir()] == ["models.json"]


def test_resync_follows_deletes_and_skips_disabled_models(cli, home, pi_dir, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")
    apply(cli, tmp_path / "m.yaml", model_spec("a", gguf), model_spec("b", gguf),
          model_spec("parked", gguf, extra="  residency: disabled\n"))
    sync(cli)
    assert list(athanor_models(pi_dir)) == ["a", "b"]

    assert cli("delete", "model", "b").returncode == 0
    result = sync(cli)
    assert "model/b removed" in result.stdout
    assert list(athanor_models(pi_dir)) == ["a"]


def test_context_window_is_what_the_runtime_is_started_with(cli, home, pi_dir, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "w" / "long.gguf", context_length=65536)
    mlx = write_tiny_mlx_llama(tmp_path / "w" / "mlx", quantized_bits=4, context_length=4096)
    apply(cli, tmp_path / "m.yaml",
          model_spec("default", gguf),                                                  # capped default: 32768
          model_spec("set", gguf, extra="  preset: {ctxSize: 1024, maxTokens: 64}\n"),
          model_spec("own", gguf, extra="  preset: {ctxSize: 0}\n"),                    # 0: the model's own
          model_spec("recipe", gguf, extra="  recipe: fast\n"),                         # the recipe's 8192
          model_spec("mlx", mlx, "mlx-lm"),                                             # config.json's length
          model_spec("missing", tmp_path / "w" / "nowhere.gguf"))                       # no weights: 8192
    sync(cli)
    found = {n: (m["contextWindow"], m["maxTokens"]) for n, m in athanor_models(pi_dir).items()}
    assert found == {"default": (32768, 16384), "set": (1024, 64), "own": (65536, 16384), "recipe": (8192, 8192),
                     "mlx": (4096, 4096), "missing": (8192, 8192)}


def test_vision_flavor_takes_images(cli, home, hf_root, pi_dir):
    add_gguf_repo(hf_root, "org/text-GGUF")
    make_hf_cache(hf_root, {"org/seeing-GGUF": {"seeing-F32.gguf": write_tiny_llama_gguf,
                                                "mmproj-seeing-f16.gguf": b"GGUF projector"}})
    add_mlx_repo(hf_root, "mlx-community/tiny-vl-4bit", quantized_bits=4, vision=True)
    assert cli("scan").returncode == 0
    sync(cli)
    inputs = {n: m["input"] for n, m in athanor_models(pi_dir).items()}
    assert inputs == {"tiny-llama-f32": ["text"], "seeing-f32": ["text", "image"], "tiny-vl-4bit": ["text"]}

    assert cli("flavor", "tiny-vl-4bit", "vlm").returncode == 0
    result = sync(cli)
    assert "model/tiny-vl-4bit updated" in result.stdout
    assert athanor_models(pi_dir)["tiny-vl-4bit"]["input"] == ["text", "image"]


def test_the_key_is_named_never_written(cli, home, pi_dir, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")
    keys = write(tmp_path / "my keys" / "gateway.keys", "# keys\n\nsk-secret-1\n")
    apply(cli, tmp_path / "m.yaml", model_spec("tiny", gguf),
          gateway_doc(f"  listen: '[::]:9090'\n  auth: {{apiKeyFile: {json.dumps(str(keys))}}}\n"))
    sync(cli)
    provider = pi_models(pi_dir)["providers"]["athanor"]
    assert provider["baseUrl"] == "http://[::1]:9090/v1"
    assert provider["apiKey"].startswith("!sed ") and f"'{keys}'" in provider["apiKey"]
    assert "sk-secret-1" not in (pi_dir / "models.json").read_text()
    # the command pi runs prints the first key: comments and blank lines skipped
    command = subprocess.run(provider["apiKey"][1:], shell=True, capture_output=True, text=True, check=True)
    assert command.stdout == "sk-secret-1\n"

    apply(cli, tmp_path / "g.yaml", gateway_doc("  listen: 0.0.0.0:9091\n  auth: {apiKeyEnv: MY_GATEWAY_KEY}\n"))
    result = sync(cli)
    assert "provider/athanor updated" in result.stdout and "0 updated, 1 unchanged" in result.stdout
    provider = pi_models(pi_dir)["providers"]["athanor"]
    assert (provider["baseUrl"], provider["apiKey"]) == ("http://127.0.0.1:9091/v1", "MY_GATEWAY_KEY")


# ------------------------------------------------------------------------------------------ commands that sync


def test_apply_and_scan_sync_when_the_gateway_asks(cli, home, hf_root, tmp_path, monkeypatch):
    pi_dir = tmp_path / "configured-pi"
    monkeypatch.delenv("PI_CODING_AGENT_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.pi/agent must stay untouched: integrations.pi.dir wins
    gguf = write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")
    result = apply(cli, tmp_path / "m.yaml", model_spec("tiny", gguf),
                   gateway_doc(f"  integrations: {{pi: {{sync: true, dir: {json.dumps(str(pi_dir))}}}}}\n"))
    assert "pi: model/tiny added" in result.stdout
    assert list(athanor_models(pi_dir)) == ["tiny"]
    assert not (tmp_path / "home" / ".pi").exists()

    result = apply(cli, tmp_path / "m.yaml", model_spec("tiny", gguf),
                   gateway_doc(f"  integrations: {{pi: {{sync: true, dir: {json.dumps(str(pi_dir))}}}}}\n"))
    assert "pi:" not in result.stdout, "nothing changed, nothing to say"

    add_gguf_repo(hf_root, "org/found-GGUF", "found-F32.gguf")
    result = cli("scan")
    assert result.returncode == 0, result.stderr
    assert "pi: model/found-f32 added" in result.stdout
    assert list(athanor_models(pi_dir)) == ["found-f32", "tiny"]

    # A file pi's sync cannot use is a warning: the apply itself succeeded.
    (pi_dir / "models.json").write_text("{oops")
    result = cli("apply", "-f", str(write(tmp_path / "n.yaml", model_spec("new", gguf))))
    assert result.returncode == 0, result.stderr
    assert "model/new created" in result.stdout
    assert "warning: the store is saved, but pi's models.json is not" in result.stderr
    assert f"{pi_dir / 'models.json'}:1:2: not valid JSON" in result.stderr
    assert (pi_dir / "models.json").read_text() == "{oops"


def test_delete_takes_the_model_out_of_pi_when_the_gateway_asks(cli, home, pi_dir, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")
    apply(cli, tmp_path / "m.yaml", model_spec("a", gguf), model_spec("b", gguf),
          gateway_doc("  integrations: {pi: {sync: true}}\n"))
    assert list(athanor_models(pi_dir)) == ["a", "b"]

    result = cli("delete", "model", "b")
    assert result.returncode == 0, result.stderr
    assert "model/b deleted" in result.stdout and "pi: model/b removed" in result.stdout
    assert list(athanor_models(pi_dir)) == ["a"]


def test_apply_leaves_pi_alone_by_default(cli, home, pi_dir, tmp_path):
    result = apply(cli, tmp_path / "m.yaml", model_spec("tiny", write_tiny_llama_gguf(tmp_path / "w" / "t.gguf")))
    assert "pi:" not in result.stdout
    assert not pi_dir.exists()


# ------------------------------------------------------------------------------------------ snippets


def test_snippet_names_the_model_the_address_and_where_the_key_is(cli, home, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")
    apply(cli, tmp_path / "m.yaml", model_spec("tiny", gguf, extra="  aliases: [small]\n"),
          gateway_doc("  listen: 0.0.0.0:9099\n"))
    result = cli("snippet", "small")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "curl -s http://127.0.0.1:9099/v1/chat/completions" in text
    assert '"model": "tiny"' in text and "Authorization" not in text
    assert 'OpenAI(base_url="http://127.0.0.1:9099/v1", api_key="unused")' in text
    assert "pi --provider athanor --model tiny" in text

    apply(cli, tmp_path / "g.yaml", gateway_doc("  auth: {apiKeyEnv: GW_KEY}\n"))
    text = cli("snippet", "tiny").stdout
    assert '-H "Authorization: Bearer $GW_KEY"' in text
    assert 'api_key=os.environ["GW_KEY"]' in text and "pi reads the key from $GW_KEY" in text

    keys = write(tmp_path / "keys", "sk-never-printed\n")
    apply(cli, tmp_path / "g.yaml", gateway_doc(f"  auth: {{apiKeyFile: {json.dumps(str(keys))}}}\n"))
    text = cli("snippet", "tiny").stdout
    assert "sk-never-printed" not in text
    assert '-H "Authorization: Bearer $(sed -n' in text and str(keys) in text

    missing = cli("snippet", "tiyn")
    assert missing.returncode == 1 and "model 'tiyn' not found; did you mean tiny?" in missing.stderr


def snippet_blocks(text: str) -> dict[str, str]:
    """The snippet's sections by their heading's first word: curl, Python, pi."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("# "):
            current = blocks.setdefault(line[2:].split()[0], [])
        else:
            current.append(line)
    return {k: "\n".join(v).strip() + "\n" for k, v in blocks.items()}


def test_the_curl_and_python_snippets_get_answers_from_the_gateway(gateway: Gateway, tmp_path):
    port = gateway.url.rsplit(":", 1)[1]
    write_gateway(tmp_path, gateway.base_spec + f"  listen: 127.0.0.1:{port}\n")
    result = gateway.athanor("snippet", "tiny-alias")
    assert result.returncode == 0, result.stderr
    blocks = snippet_blocks(result.stdout)
    curl = subprocess.run(["sh", "-c", blocks["curl"]], capture_output=True, text=True, timeout=120)
    assert curl.returncode == 0, curl.stderr
    assert json.loads(curl.stdout)["model"] == "tiny-gguf"
    python = subprocess.run([sys.executable, "-c", blocks["Python"]], capture_output=True, text=True, timeout=120)
    assert python.returncode == 0, python.stderr
    assert gateway.phase("tiny-gguf") == "Ready"


# ------------------------------------------------------------------------------------------ pi itself


def pi_binary() -> str:
    """The pinned pi from scripts/setup.sh --test, else one on PATH; skip the test when there is none."""
    local = REPO / ".venv" / "pi" / "node_modules" / ".bin" / "pi"
    found = str(local) if local.exists() else shutil.which("pi")
    if not found:
        why = "pi is not installed: 'bash scripts/setup.sh --test' puts it in .venv/pi (needs node >= 20.6)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI set the machine up: a missing pi is a broken setup, not a reason to skip
        pytest.skip(why)
    return found


def run_pi(pi_dir: Path, cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {}), "PI_CODING_AGENT_DIR": str(pi_dir), "PI_OFFLINE": "1"}
    return subprocess.run([pi_binary(), *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def serve_to_pi(gw: Gateway, tmp_path: Path, auth: str = "") -> None:
    """The gateway at the address it listens on (pi's baseUrl), with ``auth`` (Gateway spec lines), serving
    "agent", a tiny GGUF; pi's models.json written by ``athanor sync pi`` alone."""
    port = gw.url.rsplit(":", 1)[1]
    write_gateway(tmp_path, gw.base_spec + f"  listen: 127.0.0.1:{port}\n" + auth)
    # A window pi's default compaction reserve (16384 tokens) fits in, so one prompt is one request; greedy.
    weights = write_tiny_llama_gguf(tmp_path / "weights" / "agent.gguf", seed=5, context_length=32768)
    apply_models(tmp_path / "agent.yaml", model_spec(
        "agent", weights, extra="  preset: {ctxSize: 32768, maxTokens: 12, temperature: 0.0}\n"))
    result = gw.athanor("sync", "pi")
    assert result.returncode == 0, result.stderr
    assert "model/agent added" in result.stdout


def ask_pi(pi_dir: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_pi(pi_dir, cwd, "-p", "--provider", "athanor", "--model", "agent", *PI_FLAGS,
                  "--system-prompt", "Answer briefly.", "Say hello.", env=env)


def test_pi_configured_by_sync_alone_talks_to_the_gateway(pi_dir, gateway: Gateway, tmp_path):
    pi_binary()
    gateway.env["PI_CODING_AGENT_DIR"] = str(pi_dir)  # the fixture's environment may predate pi_dir's
    serve_to_pi(gateway, tmp_path)

    listed = run_pi(pi_dir, tmp_path, "--list-models", "agent")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stderr.splitlines()]  # pi lists models on stderr
    assert ["athanor", "agent", "32.8K", "12", "no", "no"] in rows, listed.stderr
    assert gateway.phase("agent") == "Standby", "listing models asks the gateway nothing"

    answer = ask_pi(pi_dir, tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "not found" not in answer.stderr, answer.stderr  # pi knew the model from models.json
    assert answer.stdout.strip(), "the model's answer came back through pi"
    assert gateway.phase("agent") == "Ready", "the gateway started the model for pi's request"
    assert gateway.runtime_pid("agent")


KEY_ENV = "ATHANOR_TEST_GATEWAY_KEY"


@pytest.mark.parametrize("where", ["env", "file"])
def test_pi_sends_the_key_from_where_the_gateway_keeps_it(pi_dir, tmp_path, monkeypatch, request, where):
    pi_binary()
    secret = f"sk-athanor-{where}-1234"
    if where == "env":
        monkeypatch.setenv(KEY_ENV, secret)  # the gateway reads auth.apiKeyEnv from its own environment
        auth = f"  auth: {{apiKeyEnv: {KEY_ENV}}}\n"
    else:
        keys = write(tmp_path / "secret dir" / "keys", f"# the gateway's keys\n\n  {secret}  \nsk-second\n")
        auth = f"  auth: {{apiKeyFile: {json.dumps(str(keys))}}}\n"
    gw: Gateway = request.getfixturevalue("gateway")  # started now: the variable is in its environment
    serve_to_pi(gw, tmp_path, auth)
    assert secret not in (pi_dir / "models.json").read_text()
    body = json.dumps({"model": "agent", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, error = gw.post("/v1/chat/completions", body)
    assert (status, error["error"]["type"]) == (401, "authentication_error"), "the gateway checks keys"

    if where == "env":
        refused = ask_pi(pi_dir, tmp_path, env={KEY_ENV: "sk-wrong"})
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert "401 the API key presented is not valid" in refused.stderr, refused.stderr  # the gateway's error
        assert (gw.phase("agent"), gw.runtime_pid("agent")) == ("Standby", None), \
            "a refused request starts nothing"

    answer = ask_pi(pi_dir, tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert answer.stdout.strip(), "the model's answer came back through pi"
    assert gw.phase("agent") == "Ready", "the gateway started the model for pi's keyed request"
