"""Ollama's API through a real gateway, asked by the real ``ollama`` client (and raw HTTP where a client's exact
sequence matters): the tiny GGUF and the tiny MLX model on their real runtimes, a tiny BERT embedding model, and a
tiny GGUF whose chat template renders tools. One gateway for the module: its runtimes load once."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone

import ollama
import pytest
from conftest import ATHANOR, write
from fixtures.serving import Gateway, model_spec, wait_until
from fixtures.shared_gateway import shared_gateway
from fixtures.tiny_models import (
    CHAT_TEMPLATE,
    TinyLlamaShape,
    TinyVisionShape,
    write_tiny_bert_gguf,
    write_tiny_llama_gguf,
    write_tiny_mlx_llama,
    write_tiny_mmproj_gguf,
    write_tiny_png,
)

# A chat template that renders tools and tool calls, as tool-capable models' templates do.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' + call['function']['name'] + ' ' + (call['function']['arguments'] | tojson) + '</tool_call>' }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SAMPLING = {"temperature": 0, "seed": 7, "num_predict": 6}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("ollama")
    with shared_gateway(root, gateway_lines="  residency: {policy: memory, budget: 90%}\n",
                        model_lines="  aliases: [tiny-alias]\n") as gw:
        weights = root / "weights"
        mlx = write_tiny_mlx_llama(weights / "tiny-mlx", quantized_bits=4)
        bert = write_tiny_bert_gguf(weights / "bert.gguf", embedding_length=48)
        tools = write_tiny_llama_gguf(weights / "tools.gguf", name="tiny-tools", context_length=1024)
        template = write(root / "tools.jinja", TOOLS_TEMPLATE)
        vision = write_tiny_llama_gguf(weights / "vision" / "tiny-vlm-F32.gguf", name="tiny-vlm")
        write_tiny_mmproj_gguf(weights / "vision" / "mmproj-tiny-vlm-F32.gguf",
                               text_embedding_length=TinyLlamaShape.hidden)
        broken = weights / "broken.gguf"
        broken.write_bytes(b"GGUF" + b"\xff" * 64)  # a header that cannot be read
        spec = write(root / "more.yaml", "---\n".join([
            model_spec("tiny-mlx", mlx, "mlx-lm", "  preset: {maxTokens: 8}\n"),
            model_spec("tiny-bert", bert),
            model_spec("tiny-vlm", vision, extra="  preset: {ctxSize: 256}\n"),
            model_spec("broken", broken),
            model_spec("tiny-tools", tools, extra=f"  preset: {{ctxSize: 768, chatTemplateFile: {json.dumps(str(template))}}}\n"),
        ]))
        applied = subprocess.run([ATHANOR, "apply", "-f", str(spec)], capture_output=True, text=True, env=gw.env)
        assert applied.returncode == 0, applied.stderr
        yield gw


@pytest.fixture
def client(served: Gateway) -> ollama.Client:
    return ollama.Client(host=served.url)


def http(served: Gateway, method: str, path: str, body: object = None,
         headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(served.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


# ---------------------------------------------------------------------------------------------- discovery


def test_copilot_discovery_sees_a_tool_capable_model(served: Gateway) -> None:
    """VS Code Copilot Chat's sequence, as raw HTTP: a numeric version at least 0.6.4, the tags, then a show per
    model whose capabilities must include "tools", with the context length under the architecture's key."""
    status, kind, body = http(served, "GET", "/api/version")
    version = json.loads(body)["version"]
    assert status == 200 and kind.startswith("application/json")
    assert tuple(int(part) for part in version.split(".")) >= (0, 6, 4)
    status, _, body = http(served, "GET", "/api/tags", headers={"Authorization": "Bearer "})  # Copilot's empty key
    listed = {m["model"]: m for m in json.loads(body)["models"]}
    assert status == 200 and {"tiny-gguf:latest", "tiny-mlx:latest", "tiny-bert:latest", "tiny-tools:latest"} <= set(listed)
    shown = {}
    for model in listed:
        status, _, body = http(served, "POST", "/api/show", {"model": model})
        assert status == 200, body
        shown[model] = json.loads(body)
    tools = shown["tiny-tools:latest"]
    assert tools["capabilities"] == ["completion", "tools"]
    assert tools["model_info"]["general.architecture"] == "llama"
    assert tools["model_info"]["llama.context_length"] == 768  # what it is served with (its preset's ctxSize)
    assert "<tool_call>" in tools["template"]
    assert "tools" not in shown["tiny-gguf:latest"]["capabilities"]  # its template renders no tools
    assert shown["tiny-bert:latest"]["capabilities"] == ["embedding"]
    assert shown["tiny-mlx:latest"]["details"]["format"] == "mlx"


def test_tags_and_show_describe_the_weights(served: Gateway, client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    gguf = listed["tiny-gguf:latest"]
    assert gguf.details.format == "gguf" and gguf.details.family == "llama"
    assert gguf.size == (served.home.parent / "weights" / "tiny.gguf").stat().st_size
    assert gguf.digest and len(gguf.digest) == 64
    assert gguf.modified_at is not None
    shown = client.show("tiny-gguf")  # no tag: the same model
    assert shown.details.quantization_level == "F32"
    assert "num_ctx" in shown.parameters and "256" in shown.parameters
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] >= 1  # the GGUF's own keys
    assert shown.template == CHAT_TEMPLATE
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404 and "not found" in caught.value.error


def test_root_answers_as_ollama_does(served: Gateway) -> None:
    status, kind, body = http(served, "GET", "/")
    assert (status, body) == (200, b"Ollama is running") and kind.startswith("text/plain")
    status, _, body = http(served, "HEAD", "/")
    assert status == 200 and body == b""
    # CORS preflights on Ollama's paths, judged by the same Gateway policy as /v1's.
    status, _, _ = http(served, "OPTIONS", "/api/chat")
    assert status == 204
    status, _, body = http(served, "OPTIONS", "/api/chat", headers={"Origin": "https://page.example",
                                                                    "Access-Control-Request-Method": "POST"})
    assert status == 403 and "spec.cors.allowOrigins" in json.loads(body)["error"]


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("model", ["tiny-gguf:latest", "tiny-mlx"])
def test_chat_streamed_and_whole_agree(client: ollama.Client, model: str) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat(model=model, messages=messages, options=SAMPLING)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.model == model
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.prompt_eval_count > 0 and whole.eval_count > 0
    assert whole.total_duration >= whole.eval_duration > 0
    parts = list(client.chat(model=model, messages=messages, options=SAMPLING, stream=True))
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content  # greedy: the same tokens
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count


def test_logprobs_come_back_per_token(client: ollama.Client) -> None:
    whole = client.chat(model="tiny-gguf", messages=[{"role": "user", "content": "hi"}], options=SAMPLING,
                        logprobs=True, top_logprobs=2)
    assert len(whole.logprobs) == whole.eval_count
    assert all(p.logprob <= 0 and len(p.top_logprobs) == 2 for p in whole.logprobs)
    assert whole.logprobs[0].token == whole.logprobs[0].top_logprobs[0].token  # greedy: the likeliest token
    parts = list(client.generate(model="tiny-gguf", prompt="hi", options=SAMPLING, logprobs=True, stream=True))
    streamed = [p for part in parts for p in (part.logprobs or [])]
    assert len(streamed) == parts[-1].eval_count
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="tiny-gguf", prompt="hi", raw=True, logprobs=True)
    assert caught.value.status_code == 400 and "logprobs" in caught.value.error


def test_generate_applies_the_template_unless_raw(client: ollama.Client) -> None:
    templated = client.generate(model="tiny-gguf", prompt="hello", options=SAMPLING)
    raw = client.generate(model="tiny-gguf", prompt="hello", raw=True, options=SAMPLING)
    assert templated.done and raw.done and templated.response and raw.response
    # The template wraps the prompt in chat markers: more prompt tokens than the raw text.
    assert templated.prompt_eval_count > raw.prompt_eval_count
    streamed = list(client.generate(model="tiny-gguf", prompt="hello", options=SAMPLING, stream=True))
    assert "".join(p.response for p in streamed) == templated.response and streamed[-1].done
    system = client.generate(model="tiny-gguf", prompt="hello", system="be brief", options=SAMPLING)
    assert system.prompt_eval_count > templated.prompt_eval_count


def test_tools_and_tool_calls_reach_the_template(client: ollama.Client) -> None:
    """Tools, an assistant's tool call (arguments as an object) and the tool's answer all reach the runtime: each
    makes the rendered prompt longer."""
    ask = [{"role": "user", "content": "weather in Paris?"}]
    plain = client.chat(model="tiny-tools", messages=ask, options=SAMPLING)
    with_tools = client.chat(model="tiny-tools", messages=ask, tools=[WEATHER_TOOL], options=SAMPLING)
    history = [*ask, {"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    answered = client.chat(model="tiny-tools", messages=history, tools=[WEATHER_TOOL], options=SAMPLING)
    assert plain.prompt_eval_count < with_tools.prompt_eval_count < answered.prompt_eval_count
    assert answered.done and answered.message.role == "assistant"


def test_images_reach_a_vision_model(client: ollama.Client) -> None:
    """Base64 images in a chat message and in a generate request become image parts the runtime's projector
    encodes: each adds the projector's tokens to the prompt."""
    text = client.chat(model="tiny-vlm", messages=[{"role": "user", "content": "what is it?"}], options=SAMPLING)
    png = write_tiny_png()
    seen = client.chat(model="tiny-vlm", messages=[{"role": "user", "content": "what is it?", "images": [png]}],
                       options=SAMPLING)
    assert seen.prompt_eval_count == text.prompt_eval_count + TinyVisionShape.patches()
    generated = client.generate(model="tiny-vlm", prompt="what is it?", images=[png], options=SAMPLING)
    assert generated.prompt_eval_count == seen.prompt_eval_count and generated.done
    assert "vision" in client.show("tiny-vlm").capabilities


def test_format_json_is_passed_as_a_response_format(client: ollama.Client) -> None:
    """llama-server turns response_format into a grammar: whatever the random weights pick, it is JSON."""
    answer = client.generate(model="tiny-gguf", prompt="a json object", format="json",
                             options={"temperature": 0, "seed": 1, "num_predict": 40})
    assert answer.response.lstrip().startswith(("{", "["))


def test_embed_matches_the_openai_route(served: Gateway, client: ollama.Client) -> None:
    embedded = client.embed(model="tiny-bert", input=["hello world", "good morning"])
    assert embedded.model == "tiny-bert" and [len(v) for v in embedded.embeddings] == [48, 48]
    assert embedded.prompt_eval_count > 0
    status, _, body = http(served, "POST", "/v1/embeddings", {"model": "tiny-bert", "input": ["hello world"]})
    assert status == 200
    direct = json.loads(body)["data"][0]["embedding"]
    assert embedded.embeddings[0] == pytest.approx(direct)
    legacy = client.embeddings(model="tiny-bert", prompt="hello world")
    assert list(legacy.embedding) == pytest.approx(direct)


# ---------------------------------------------------------------------------------------------- residency


def test_ps_load_keep_alive_and_unload(served: Gateway, client: ollama.Client) -> None:
    loaded = client.generate(model="tiny-gguf", prompt="")  # nothing to generate: load it
    assert loaded.done and loaded.done_reason == "load" and served.phase("tiny-gguf") == "Ready"
    client.generate(model="tiny-gguf", prompt="hi", keep_alive="10m", options=SAMPLING)
    running = {m.model: m for m in client.ps().models}
    entry = running["tiny-gguf:latest"]
    assert entry.context_length == 256 and entry.size > entry.size_vram >= 0
    left = (entry.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 500 < left <= 600, left  # the keep_alive, not the Gateway's idle limit
    client.generate(model="tiny-gguf", prompt="hi", keep_alive=-1, options=SAMPLING)
    entry = {m.model: m for m in client.ps().models}["tiny-gguf:latest"]
    assert entry.expires_at.year > 2200  # kept loaded
    unloaded = client.generate(model="tiny-gguf", prompt="", keep_alive=0)  # Open WebUI's eject
    assert unloaded.done_reason == "unload"
    assert served.phase("tiny-gguf") == "Standby"
    assert "tiny-gguf:latest" not in {m.model for m in client.ps().models}


def test_keep_alive_zero_unloads_after_the_answer(served: Gateway, client: ollama.Client) -> None:
    answer = client.chat(model="tiny-gguf", messages=[{"role": "user", "content": "hi"}], keep_alive=0,
                         options=SAMPLING)
    assert answer.done and answer.message.content
    wait_until(lambda: served.phase("tiny-gguf") == "Standby", 30, "tiny-gguf to unload")


# ---------------------------------------------------------------------------------------------- errors


def test_errors_in_ollamas_shape(served: Gateway, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nobody:latest", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404 and "/api/tags" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="tiny-gguf", prompt="hi", options={"num_ctx": 4096})
    assert caught.value.status_code == 400 and "256-token context" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="tiny-gguf", prompt="hi", options={"temperature": "hot"})
    assert caught.value.status_code == 400 and "options.temperature" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="tiny-gguf", messages=[{"role": "user", "content": "hi"}], think=True)
    assert caught.value.status_code == 400 and "no thinking mode" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="tiny-gguf", input="hello")
    assert caught.value.status_code == 400 and "generates text" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503 and "broken" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.copy("tiny-gguf", "other")
    assert caught.value.status_code == 501 and "aliases" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete("tiny-gguf")
    assert caught.value.status_code == 501 and "athanor delete" in caught.value.error
    for path, body in (("/api/chat", b"{not json"), ("/api/tags", None), ("/api/nothing", None)):
        method = "POST" if body is not None else "GET"
        request = urllib.request.Request(served.url + path, data=body, method=method,
                                         headers={"Host": "evil.example" if path == "/api/tags" else "127.0.0.1"})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                status, reply = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, reply = exc.code, exc.read()
        assert status == {"/api/chat": 400, "/api/tags": 403, "/api/nothing": 404}[path], (path, reply)
        assert list(json.loads(reply)) == ["error"], reply


def test_a_streamed_request_for_a_loading_model_waits_in_ndjson(served: Gateway, client: ollama.Client) -> None:
    """A stream for a model that is not loaded starts at once (NDJSON) and carries only JSON lines while the
    model loads, then the answer and its final object with the load counted."""
    client.generate(model="tiny-mlx", prompt="", keep_alive=0)
    assert served.phase("tiny-mlx") == "Standby"
    started = time.monotonic()
    parts = list(client.generate(model="tiny-mlx", prompt="hello", stream=True, options=SAMPLING))
    assert parts[-1].done and parts[-1].load_duration > 0
    assert parts[-1].load_duration <= (time.monotonic() - started) * 1e9
    assert parts[-1].total_duration >= parts[-1].load_duration


def test_model_names_with_tags_resolve(client: ollama.Client, served: Gateway) -> None:
    by_alias = client.chat(model="tiny-alias:latest", messages=[{"role": "user", "content": "hi"}], options=SAMPLING)
    assert by_alias.model == "tiny-alias:latest" and by_alias.done
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="tiny-gguf:q8", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
