"""Ollama's shapes to and from OpenAI's: the translation of requests (pure), and tool calls and thinking coming
back from a runtime through the real controller and ingress (the fast tier's scripted runtime streams a tool call
the way llama-server does), read by the real async ``ollama`` client."""

from __future__ import annotations

import base64
import json
import math

import ollama
import pytest
from fixtures.tier import Tier

from athanor.ollama import shapes

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 16).decode()


# ---------------------------------------------------------------------------------------------- requests


def test_chat_request_maps_messages_tools_and_options() -> None:
    body = {
        "model": "m:latest",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is this?", "images": [PNG, JPEG]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            {"role": "tool", "content": "snow", "tool_name": "get_weather"},
        ],
        "tools": [WEATHER_TOOL],
        "options": {"temperature": 0.2, "top_k": 5, "num_predict": 12, "stop": "END", "repeat_penalty": 1.1,
                    "num_gpu": 99, "num_ctx": 2048},
        "format": {"type": "object"},
        "think": "low",
    }
    out = shapes.chat_request(body, "served")
    assert out.route == "/v1/chat/completions" and out.stream is True and out.num_ctx == 2048
    sent = out.body
    assert sent["model"] == "served" and sent["tools"] == [WEATHER_TOOL]
    assert (sent["temperature"], sent["top_k"], sent["max_tokens"], sent["stop"], sent["repeat_penalty"]) == (
        0.2, 5, 12, ["END"], 1.1)
    assert "num_gpu" not in json.dumps(sent)  # a loading option: the preset decides
    assert sent["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": {"type": "object"}}}
    assert sent["reasoning_effort"] == "low" and sent["stream_options"] == {"include_usage": True}
    user = sent["messages"][1]["content"]
    assert user[0] == {"type": "text", "text": "what is this?"}
    assert user[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user[2]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    calls = sent["messages"][2]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    # Each tool answer gets the id of the call it answers, in order.
    assert [m.get("tool_call_id") for m in sent["messages"][3:]] == [calls[0]["id"], calls[1]["id"]]


def test_generate_and_embed_requests() -> None:
    chat = shapes.generate_request({"prompt": "hi", "system": "s", "stream": False,
                                    "options": {"num_predict": -1}}, "m")
    assert chat.route == "/v1/chat/completions" and chat.stream is False
    assert chat.body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert "max_tokens" not in chat.body and "stream_options" not in chat.body  # -1: the runtime's own limit
    raw = shapes.generate_request({"prompt": "hi", "raw": True, "format": "json"}, "m")
    assert raw.route == "/v1/completions" and raw.body["prompt"] == "hi"
    assert raw.body["response_format"] == {"type": "json_object"}
    embed = shapes.embed_request({"input": ["a", "b"], "dimensions": 8}, "e", legacy=False)
    assert (embed.route, embed.body) == ("/v1/embeddings", {"model": "e", "input": ["a", "b"], "dimensions": 8})
    legacy = shapes.embed_request({"prompt": "a"}, "e", legacy=True)
    assert legacy.body == {"model": "e", "input": "a"}


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": "hi"}, "messages must be a list"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "images": ["%%%"]}]}, "messages[0].images[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]}, "tool_calls[0]"),
    ({"messages": [], "options": {"temperature": "hot"}}, "options.temperature"),
    ({"messages": [], "options": {"warp": 9}}, "options.warp"),
    ({"messages": [], "options": []}, "options must be an object"),
    ({"messages": [], "format": "yaml"}, "format"),
    ({"messages": [], "think": "very"}, "think"),
    ({"messages": [], "stream": "yes"}, "stream"),
    ({"messages": [], "tools": {"a": 1}}, "tools"),
])
def test_bad_chat_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(shapes.BadRequest) as caught:
        shapes.chat_request(body, "m")
    assert field in str(caught.value)


def test_names_and_keep_alive() -> None:
    assert shapes.candidates("qwen3:latest") == ["qwen3:latest", "qwen3"]
    assert shapes.candidates("org/repo:Q4_K_M") == ["org/repo:Q4_K_M"]
    assert shapes.tagged("qwen3") == "qwen3:latest" and shapes.tagged("qwen3:8b") == "qwen3:8b"
    assert shapes.tagged("org/repo") == "org/repo:latest"
    with pytest.raises(shapes.BadRequest):
        shapes.model_name({"model": "  "})
    assert shapes.model_name({"name": "old-client"}) == "old-client"
    parsed = {value: shapes.keep_alive_seconds(value) for value in
              (None, 0, "0", 300, "300", "5m", "1h30m", "1.5h", "250ms", -1, "-1", "-1m")}
    assert parsed == {None: None, 0: 0, "0": 0, 300: 300, "300": 300, "5m": 300, "1h30m": 5400, "1.5h": 5400,
                      "250ms": 0.25, -1: math.inf, "-1": math.inf, "-1m": math.inf}
    for bad in ("soon", "5 minutes", [], True, "nan"):
        with pytest.raises(shapes.BadRequest):
            shapes.keep_alive_seconds(bad)


# ---------------------------------------------------------------------------------------------- answers


def test_a_stream_with_an_error_event_ends_with_ollamas_error() -> None:
    translator = shapes.StreamTranslator("m", shapes.Clock(), generate=False)
    out = translator.feed(b': loading m, 3 s\n\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\n'
                          b'data: {"error":{"message":"runtime died","type":"server_error"}}\n\n')
    assert [o.get("message", {}).get("content") for o in out[:1]] == ["a"]
    assert out[1] == {"error": "runtime died"} and translator.done
    assert translator.feed(b"data: [DONE]\n\n") == []  # nothing after the error


def test_a_whole_answer_with_llama_server_timings() -> None:
    clock = shapes.Clock()
    answer = {"choices": [{"finish_reason": "length", "message": {"role": "assistant", "content": "x",
                                                                  "reasoning_content": "hmm"}}],
              "usage": {"prompt_tokens": 30, "completion_tokens": 4},
              "timings": {"prompt_n": 2, "prompt_ms": 12.5, "predicted_n": 4, "predicted_ms": 40.0}}
    out = shapes.chat_answer(answer, "m:latest", clock, generate=False)
    assert out["message"] == {"role": "assistant", "content": "x", "thinking": "hmm"}
    assert (out["done"], out["done_reason"], out["prompt_eval_count"], out["eval_count"]) == (True, "length", 30, 4)
    assert (out["prompt_eval_duration"], out["eval_duration"]) == (12_500_000, 40_000_000)
    assert out["total_duration"] >= 0 and out["load_duration"] == 0
    generated = shapes.chat_answer(answer, "m", clock, generate=True)
    assert generated["response"] == "x" and generated["thinking"] == "hmm" and "message" not in generated


# ---------------------------------------------------------------------------------------------- through the gateway


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_and_thinking_come_back_as_ollama_objects(tier: Tier, stream: bool) -> None:
    """The runtime answers a tool call (streamed in pieces, or whole): the Ollama client gets it whole, with its
    arguments as an object; the runtime's reasoning_content arrives as thinking."""
    tier.model("toolish")
    tier.script("toolish", toolCall={"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
                thinking="let me check")

    async def scenario() -> list[ollama.ChatResponse]:
        async with tier.controller() as controller, tier.ingress(controller) as url:
            client = ollama.AsyncClient(host=url)
            messages = [{"role": "user", "content": "weather?"}]
            if stream:
                return [part async for part in await client.chat(model="toolish:latest", messages=messages,
                                                                 tools=[WEATHER_TOOL], stream=True)]
            return [await client.chat(model="toolish", messages=messages, tools=[WEATHER_TOOL])]

    parts = tier.run(scenario)
    calls = [call for part in parts for call in (part.message.tool_calls or [])]
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather" and dict(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    assert "".join(part.message.thinking or "" for part in parts) == "let me check"
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert parts[-1].prompt_eval_count == 1 and parts[-1].eval_count == 1  # the runtime's usage
