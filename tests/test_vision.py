"""GGUF vision end to end: a tiny random-weight CLIP projector (fixtures/tiny_models.write_tiny_mmproj_gguf) that the
real llama-server loads with --mmproj beside the tiny llama, answering OpenAI image content parts (data URLs),
directly and through a real athanor gateway that finds the mmproj*.gguf beside the weights.

The projector is LLaVA-1.5's shape in miniature: a 32x32 image in 8x8 patches gives 16 image embeddings, so a
prompt with one image is exactly 16 tokens longer than the same prompt without it. That difference is how the tests
know the runtime decoded the image (rather than dropping the part or answering from the text alone).

MLX vision: a tiny random-weight Qwen2-VL (fixtures/tiny_models.write_tiny_mlx_qwen2_vl) on the real mlx_vlm.server
through the gateway (runtime mlx-vlm), where an image costs 4 merged patches plus the vision start/end tokens.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import psutil
import pytest
from fixtures.llama_direct import LlamaServer
from fixtures.serving import Gateway, apply_models, model_spec
from fixtures.tiny_models import (
    TinyLlamaShape,
    TinyQwen2VLShape,
    TinyVisionShape,
    write_tiny_llama_gguf,
    write_tiny_mlx_qwen2_vl,
    write_tiny_mmproj_gguf,
    write_tiny_png,
)

QUESTION = "what is this?"
IMAGE_TOKENS = TinyVisionShape.patches()  # one embedding per patch, the class token dropped by the projector


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_message(png: bytes | None) -> list[dict[str, object]]:
    content: list[dict[str, object]] = [{"type": "text", "text": QUESTION}]
    if png is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(png)}})
    return [{"role": "user", "content": content}]


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


@pytest.fixture
def vision_weights(tmp_path: Path) -> Path:
    """The tiny llama and, beside it, a projector named as llama.cpp repos name theirs; returns the model file."""
    model = write_tiny_llama_gguf(tmp_path / "vision" / "tiny-vlm-F32.gguf", name="tiny-vlm")
    write_tiny_mmproj_gguf(tmp_path / "vision" / "mmproj-tiny-vlm-F32.gguf",
                           text_embedding_length=TinyLlamaShape.hidden)
    return model


# ---------------------------------------------------------------------------------------------- the files


def test_mmproj_metadata_is_what_llama_cpp_reads(tmp_path: Path) -> None:
    path = write_tiny_mmproj_gguf(tmp_path / "mmproj.gguf", text_embedding_length=48)
    reader = gguf.GGUFReader(path)

    def field(key: str) -> object:
        return reader.fields[key].contents()

    v = TinyVisionShape
    assert field("general.architecture") == "clip"
    assert field(gguf.Keys.Clip.HAS_VISION_ENCODER) is True
    assert field(gguf.Keys.Clip.PROJECTOR_TYPE) == "mlp"
    assert field(gguf.Keys.ClipVision.IMAGE_SIZE) == v.image_size
    assert field(gguf.Keys.ClipVision.PATCH_SIZE) == v.patch_size
    assert field(gguf.Keys.ClipVision.EMBEDDING_LENGTH) == v.hidden
    assert field(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH) == v.ffn
    assert field(gguf.Keys.ClipVision.BLOCK_COUNT) == v.layers
    assert field(gguf.Keys.ClipVision.Attention.HEAD_COUNT) == v.heads
    assert math.isclose(field(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS), v.eps, rel_tol=1e-6)
    assert len(field(gguf.Keys.ClipVision.IMAGE_MEAN)) == len(field(gguf.Keys.ClipVision.IMAGE_STD)) == 3
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # GGUF's (ggml's) dim order
    assert tensors["v.patch_embd.weight"] == (v.patch_size, v.patch_size, 3, v.hidden)
    assert tensors["v.position_embd.weight"] == (v.hidden, v.patches() + 1)
    assert tensors["mm.0.weight"] == (v.hidden, 48)
    assert tensors["mm.2.weight"] == (48, 48)  # the projector's output is the text model's embedding width
    assert write_tiny_mmproj_gguf(tmp_path / "again.gguf", text_embedding_length=48).read_bytes() == path.read_bytes()


def test_png_writer_makes_a_valid_png(tmp_path: Path) -> None:
    png = write_tiny_png(tmp_path / "a.png", width=5, height=3)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and (tmp_path / "a.png").read_bytes() == png
    assert png[12:16] == b"IHDR" and png[16:24] == (5).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert png.endswith(b"IEND\xaeB`\x82")


# ---------------------------------------------------------------------------------------------- llama-server itself


def test_llama_server_answers_an_image_content_part(llama_server: LlamaServer, vision_weights: Path) -> None:
    mmproj = vision_weights.with_name("mmproj-tiny-vlm-F32.gguf")
    proc, url, log = llama_server(vision_weights, "-c", "256", "--mmproj", str(mmproj))
    assert proc.poll() is None, log.read_text()
    assert "loaded multimodal model" in log.read_text()

    text_only = post(f"{url}/v1/chat/completions", {"messages": image_message(None), "max_tokens": 2})
    with_image = post(f"{url}/v1/chat/completions",
                      {"messages": image_message(write_tiny_png()), "max_tokens": 2})
    assert with_image["choices"][0]["message"]["content"]  # gibberish from random weights, but an answer
    assert with_image["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + IMAGE_TOKENS


def test_llama_server_refuses_a_projector_for_another_text_width(llama_server: LlamaServer, tmp_path: Path) -> None:
    model = write_tiny_llama_gguf(tmp_path / "w" / "tiny.gguf")
    mmproj = write_tiny_mmproj_gguf(tmp_path / "w" / "mmproj-wide.gguf", text_embedding_length=48)
    proc, _, log = llama_server(model, "-c", "256", "--mmproj", str(mmproj))
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert "mismatch" in log.read_text().lower()


# ---------------------------------------------------------------------------------------------- through the gateway


def _runtime_cmdline(gateway: Gateway, name: str) -> list[str]:
    pid = gateway.runtime_pid(name)
    assert pid is not None
    return psutil.Process(pid).cmdline()


def test_gateway_serves_image_parts_and_bodies_of_several_mib(gateway: Gateway, vision_weights: Path,
                                                              tmp_path: Path) -> None:
    apply_models(tmp_path / "vision.yaml", model_spec("tiny-vlm", vision_weights,
                                                      extra="  preset: {ctxSize: 256, maxTokens: 2}\n"))
    described = gateway.athanor("describe", "model", "tiny-vlm")
    assert described.returncode == 0, described.stderr
    assert "mmproj-tiny-vlm-F32.gguf" in described.stdout  # discovery found the projector beside the weights
    client = gateway.client

    text_only = client.chat.completions.create(model="tiny-vlm", messages=image_message(None), max_tokens=2)
    pid = gateway.runtime_pid("tiny-vlm")
    cmdline = _runtime_cmdline(gateway, "tiny-vlm")
    assert cmdline[cmdline.index("--mmproj") + 1] == str(vision_weights.with_name("mmproj-tiny-vlm-F32.gguf"))

    small = client.chat.completions.create(model="tiny-vlm", messages=image_message(write_tiny_png()),
                                           max_tokens=2)
    assert small.model == "tiny-vlm"
    assert small.choices[0].message.content
    assert small.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS

    # A 1024x1024 PNG of random pixels barely compresses: about 3 MiB, 4 MiB as base64 in the JSON body. The
    # gateway reads it (under its 32 MiB limit), rewrites the model name and forwards it with a Content-Length;
    # the runtime decodes the whole PNG (a truncated one would not decode) and resizes it to 32x32.
    big_png = write_tiny_png(width=1024, height=1024, noise=True, seed=1)
    messages = image_message(big_png)
    body_size = len(json.dumps({"model": "tiny-vlm", "messages": messages, "max_tokens": 2}))
    assert 4 * 2**20 < body_size < 6 * 2**20
    big = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=2)
    assert big.choices[0].message.content
    assert big.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS

    # The runtime's own log (athanor's per-model log): it loaded the projector and ran exactly these three tasks.
    log = (gateway.home / "logs" / "tiny-vlm.log").read_text()
    assert "loaded multimodal model" in log
    assert log.count("processing task") == 3
    assert gateway.runtime_pid("tiny-vlm") == pid  # one runtime answered all three


# ---------------------------------------------------------------------------------------------- mlx-vlm


def test_mlx_vlm_preset_flags_exist_in_the_installed_server() -> None:
    """Every flag athanor renders for mlx-vlm is one the installed mlx_vlm.server accepts."""
    from athanor.runtimes.presets import PRESET_KEYS

    help_text = subprocess.run([sys.executable, "-m", "mlx_vlm.server", "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    flags = {key.flags["mlx-vlm"] for key in PRESET_KEYS.values() if "mlx-vlm" in key.flags}
    assert flags and not {f for f in flags if f not in help_text.split()}


def test_gateway_serves_image_parts_on_mlx_vlm(gateway: Gateway, tmp_path: Path) -> None:
    """The tiny Qwen2-VL on the real mlx_vlm.server, through the gateway: a text prompt, an image part, and a
    body of several MiB. An image costs <|vision_start|>, 4 merged patches and <|vision_end|> in its prompt."""
    weights = write_tiny_mlx_qwen2_vl(tmp_path / "weights" / "tiny-qwen2-vl")
    apply_models(tmp_path / "vlm.yaml", model_spec("tiny-vl", weights, "mlx-vlm", "  preset: {maxTokens: 2}\n"))
    client = gateway.client

    text_only = client.chat.completions.create(model="tiny-vl", messages=image_message(None), max_tokens=2)
    cmdline = _runtime_cmdline(gateway, "tiny-vl")
    # the server's own script, run by athanor's secret guard (runtimes/guarded.py) in the same process
    assert any(Path(part).name == "mlx_vlm.server" for part in cmdline[:cmdline.index("--model")]), cmdline
    assert cmdline[cmdline.index("--model") + 1] == str(weights)
    small = client.chat.completions.create(model="tiny-vl", messages=image_message(write_tiny_png()), max_tokens=2)
    assert small.model == "tiny-vl"
    assert isinstance(small.choices[0].message.content, str) and 0 < small.usage.completion_tokens <= 2
    assert small.usage.prompt_tokens == text_only.usage.prompt_tokens + TinyQwen2VLShape.image_tokens() + 2

    messages = image_message(write_tiny_png(width=1024, height=1024, noise=True, seed=2))
    assert len(json.dumps({"model": "tiny-vl", "messages": messages})) > 4 * 2**20
    big = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=2)
    assert big.usage.prompt_tokens == small.usage.prompt_tokens

    log = (gateway.home / "logs" / "tiny-vl.log").read_text()  # the runtime's own account of the three
    completed = [line for line in log.splitlines() if "Request completed: endpoint=/chat/completions" in line]
    assert [f"prompt_tokens={n} " in line for line, n in zip(completed, (
        text_only.usage.prompt_tokens, small.usage.prompt_tokens, big.usage.prompt_tokens), strict=True)] == [True] * 3
