"""Runtime coverage: flags athanor does not know (spec.args), draft models, reasoning controls, hidden models and
models that embed or rerank, each through the real CLI, daemon and llama-server."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import psutil
import pytest
from conftest import write
from fixtures.serving import Gateway, apply_models, chat, model_spec, write_gateway
from fixtures.tiny_models import write_tiny_bert_gguf, write_tiny_llama_gguf, write_tiny_reranker_gguf


def gguf_model(tmp_path: Path, name: str = "tiny", extra: str = "", **kv: str) -> str:
    weights = write_tiny_llama_gguf(tmp_path / "weights" / f"{name}.gguf", seed=7, extra_kv=kv or None)
    return model_spec(name, weights, extra=extra)


def test_managed_flags_in_args_are_refused_naming_the_field_to_use(cli, home, tmp_path):
    spec = write(tmp_path / "m.yaml", gguf_model(tmp_path, extra=(
        '  args: ["--no-warmup", "-c", "4096", "--port=9999", "--alias", "x", "--spec-draft-model", "d.gguf",'
        ' "--slot-save-path", "/tmp"]\n')))
    result = cli("apply", "-f", str(spec))
    assert result.returncode != 0
    errors = result.stderr
    assert "spec.args[1]: -c is set by athanor; use spec.preset.ctxSize instead" in errors
    assert "spec.args[3]: --port is set by athanor; use spec.port instead" in errors
    assert "spec.args[4]: --alias is set by athanor; use spec.aliases" in errors
    assert "spec.args[6]: --spec-draft-model is set by athanor; use spec.draft instead" in errors
    assert "spec.args[8]: --slot-save-path is set by athanor; use the Gateway's parking" in errors
    assert "spec.args[0]" not in errors and "spec.args[2]" not in errors, "values and unknown flags pass"
    assert cli("get", "models").stdout.strip() == "", "nothing was applied"


def test_args_and_gateway_defaults_reach_argv_with_their_origin(cli, home, tmp_path):
    gateway = write(tmp_path / "gw.yaml", "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: default}\n"
                    "spec:\n  runtimes:\n    llama-server: {args: [--metrics]}\n")
    spec = write(tmp_path / "m.yaml", gguf_model(tmp_path, extra='  args: ["--no-warmup"]\n  preset: {ctxSize: 128}\n'))
    assert cli("apply", "-f", str(gateway), "-f", str(spec)).returncode == 0
    out = cli("describe", "model", "tiny").stdout
    rows = {line.split()[0]: line for line in out.split("Argv, where each part comes from:")[1].splitlines()[1:]
            if line.strip() and not line.startswith("Manager")}
    assert rows["--metrics"].split()[-1] == "runtimes.llama-server.args"
    assert rows["--no-warmup"].split()[-1] == "spec.args"
    assert "preset ctxSize (model)" in rows["--ctx-size"]
    assert "spec.port" in rows["--port"]
    command = next(line for line in out.splitlines() if line.strip().startswith("Command:"))
    assert command.index("--metrics") < command.index("--no-warmup"), "the model's own args come last"


def test_args_reach_the_real_runtime(gateway: Gateway, tmp_path):
    apply_models(tmp_path / "m.yaml", gguf_model(tmp_path, "flagged", '  args: ["--no-warmup", "--metrics"]\n'))
    assert chat(gateway.client, "flagged").model == "flagged"
    cmdline = psutil.Process(gateway.runtime_pid("flagged")).cmdline()
    assert cmdline[-2:] == ["--no-warmup", "--metrics"]


def test_env_reaches_the_runtime_and_managed_variables_are_refused(gateway: Gateway, tmp_path):
    bad = write(tmp_path / "bad.yaml", gguf_model(tmp_path, "bad", "  env: {LLAMA_ARG_PORT: '1'}\n"))
    refused = gateway.athanor("apply", "-f", str(bad))
    assert refused.returncode != 0 and "spec.env.LLAMA_ARG_PORT" in refused.stderr and "set by athanor" in refused.stderr
    write_gateway(tmp_path, gateway.base_spec + "  runtimes:\n    llama-server: {env: {ATHANOR_TEST_A: gateway, "
                  "ATHANOR_TEST_B: gateway}}\n")
    apply_models(tmp_path / "m.yaml", gguf_model(tmp_path, "envy", "  env: {ATHANOR_TEST_B: model}\n"))
    assert chat(gateway.client, "envy").model == "envy"
    environ = psutil.Process(gateway.runtime_pid("envy")).environ()
    assert environ["ATHANOR_TEST_A"] == "gateway" and environ["ATHANOR_TEST_B"] == "model"


def test_a_hidden_model_is_routed_but_not_listed(gateway: Gateway, tmp_path):
    apply_models(tmp_path / "m.yaml", gguf_model(tmp_path, "hidden", "  publish: false\n"))
    assert "hidden" not in [m.id for m in gateway.client.models.list().data]
    assert gateway.client.models.retrieve("hidden").id == "hidden"
    assert chat(gateway.client, "hidden").model == "hidden"


def test_speculative_decoding_with_a_registered_draft_model(gateway: Gateway, tmp_path):
    draft = write_tiny_llama_gguf(tmp_path / "weights" / "draft.gguf", seed=8)
    target = write_tiny_llama_gguf(tmp_path / "weights" / "target.gguf", seed=9)
    apply_models(tmp_path / "m.yaml", model_spec("drafty", draft),
                 model_spec("target", target, extra="  draft: drafty\n  preset: {maxTokens: 16}\n"))
    reply = gateway.client.chat.completions.create(model="target", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=16, temperature=0)
    assert reply.model == "target" and reply.usage.completion_tokens >= 1
    cmdline = psutil.Process(gateway.runtime_pid("target")).cmdline()
    assert cmdline[cmdline.index("--spec-draft-model") + 1] == str(draft)
    assert cmdline[cmdline.index("--spec-type") + 1] == "draft-simple"
    log = (gateway.home / "logs" / "target.log").read_text()
    assert str(draft) in log, "llama-server loaded the draft model"
    assert "draft acceptance" in log, "and drafted with it"
    assert gateway.runtime_pid("drafty") is None, "the draft is loaded inside the target's runtime, not on its own"


def test_a_missing_draft_model_is_refused_before_anything_starts(gateway: Gateway, tmp_path):
    target = write_tiny_llama_gguf(tmp_path / "weights" / "target.gguf", seed=9)
    apply_models(tmp_path / "m.yaml", model_spec("target", target, extra="  draft: nowhere\n"))
    with pytest.raises(openai.APIStatusError) as caught:
        chat(gateway.client, "target")
    assert caught.value.status_code == 503 and "draft model 'nowhere'" in str(caught.value)


def test_reasoning_controls_are_mapped_or_refused(gateway: Gateway, tmp_path):
    plain = '{% for m in messages %}{{ m.content }}{% endfor %}'
    thinking = '{% if enable_thinking %}<think>{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}'
    apply_models(tmp_path / "m.yaml",
                 gguf_model(tmp_path, "plain", **{"tokenizer.chat_template": plain}),
                 gguf_model(tmp_path, "thinker", **{"tokenizer.chat_template": thinking}))
    described = gateway.athanor("get", "models", "thinker", "-o", "json").stdout
    assert "reasoning" in json.loads(described)["status"]["artifact"]["capabilities"]
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2, reasoning_effort="high")
    assert "has no thinking mode" in str(caught.value) and caught.value.body["param"] == "reasoning_effort"
    assert gateway.runtime_pid("plain") is None, "a refused request starts nothing"
    for effort in ("high", "none"):
        reply = gateway.client.chat.completions.create(
            model="thinker", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, reasoning_effort=effort)
        assert reply.model == "thinker"
    reply = gateway.client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=2, reasoning_effort="none")
    assert reply.model == "plain", "asking for no reasoning is always fine"


def test_an_embedding_model_and_a_chat_model_serve_side_by_side(gateway: Gateway, tmp_path):
    """The common RAG setup: under memory residency a small embedding model stays loaded next to the chat model,
    each answering its own route through the openai SDK."""
    write_gateway(tmp_path, gateway.base_spec + "  residency: {policy: memory, budget: 90%}\n")
    bert = write_tiny_bert_gguf(tmp_path / "weights" / "bert.gguf", embedding_length=48)
    reranker = write_tiny_reranker_gguf(tmp_path / "weights" / "reranker.gguf")
    apply_models(tmp_path / "m.yaml", model_spec("embedder", bert), model_spec("ranker", reranker))
    described = json.loads(gateway.athanor("get", "models", "embedder", "-o", "json").stdout)
    assert described["status"]["artifact"]["capabilities"] == ["embedding"]
    client = gateway.client
    vectors = client.embeddings.create(model="embedder", input=["hello world", "good morning"])
    assert [len(item.embedding) for item in vectors.data] == [48, 48] and vectors.model == "embedder"
    assert chat(client, "tiny-gguf").model == "tiny-gguf"
    again = client.embeddings.create(model="embedder", input="hello")
    assert len(again.data[0].embedding) == 48
    assert gateway.phase("embedder") == "Ready" and gateway.phase("tiny-gguf") == "Ready", "both stay loaded"
    assert "--embeddings" in psutil.Process(gateway.runtime_pid("embedder")).cmdline()
    status, reply = gateway.post("/v1/rerank", json.dumps({"model": "ranker", "query": "hello",
                                                           "documents": ["hello world", "good morning"]}).encode())
    assert status == 200 and len(reply["results"]) == 2
    # Each model answers only what it is: clear 400s, and nothing starts for them.
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "embedder")
    assert "is an embedding model" in str(caught.value) and "/v1/embeddings" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="tiny-gguf", input="hello")
    assert "generates text" in str(caught.value)
