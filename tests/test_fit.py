"""The memory estimate (athanor/fit): published KV cache sizes, cache types, sliding windows, the projector and
the draft, bands and headroom, the recommended context, and ``athanor fit`` through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from athanor.fit import (Estimate, Memory, band, estimate_meta, estimate_model, headroom, machine_memory,
                         recommended_context)
from athanor.fit._memory import parse_vm_stat
from conftest import write
from fixtures.tiny_models import TinyLlamaShape, write_tiny_llama_gguf

KiB, GiB = 2**10, 2**30

# Qwen3-8B as its GGUF header, its config.json and discovery's facts say it: 36 layers, 8 KV heads of width 128.
QWEN3_8B_GGUF = {"general.architecture": "qwen3", "qwen3.block_count": 36, "qwen3.attention.head_count": 32,
                 "qwen3.attention.head_count_kv": 8, "qwen3.attention.key_length": 128,
                 "qwen3.attention.value_length": 128, "qwen3.embedding_length": 4096, "qwen3.context_length": 40960}
QWEN3_8B_CONFIG = {"model_type": "qwen3", "num_hidden_layers": 36, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 4096, "max_position_embeddings": 40960}
QWEN3_8B_FACTS = {"architecture": "qwen3", "layers": 36, "heads": 32, "kvHeads": 8, "embeddingLength": 4096,
                  "contextLength": 40960, "parameters": 8_190_735_360, "quantization": "Q4_K_M"}
QWEN3_8B_Q4_K_M_BYTES = 5_027_783_488  # Qwen/Qwen3-8B-GGUF, Qwen3-8B-Q4_K_M.gguf
# Gemma-3-27B: 62 layers, 16 KV heads of width 128, a 1024-token window on five layers in six.
GEMMA3_27B_GGUF = {"general.architecture": "gemma3", "gemma3.block_count": 62, "gemma3.attention.head_count": 32,
                   "gemma3.attention.head_count_kv": 16, "gemma3.attention.key_length": 128,
                   "gemma3.attention.value_length": 128, "gemma3.embedding_length": 5376,
                   "gemma3.attention.sliding_window": 1024, "gemma3.context_length": 131072}

TINY_KV_PER_TOKEN = 2 * TinyLlamaShape.layers * TinyLlamaShape.kv_heads * TinyLlamaShape.head_dim() * 2  # f16


@pytest.mark.parametrize("meta", [QWEN3_8B_GGUF, QWEN3_8B_CONFIG, QWEN3_8B_FACTS], ids=["gguf", "config", "facts"])
@pytest.mark.parametrize("runtime", ["llama-server", "mlx-lm"])
def test_qwen3_8b_keeps_144_kib_per_token_at_f16(meta, runtime):
    estimate = estimate_meta(meta, weights_bytes=1, runtime=runtime, context=8192)
    assert estimate.kv_cache == 144 * KiB * 8192
    assert estimate.context == 8192


def test_quantized_caches_count_their_block_scales():
    elements = 36 * 8 * 128 * 2 * 8192  # K and V
    for cache_type, num in (("q8_0", 34), ("q4_0", 18), ("q5_1", 24), ("iq4_nl", 18)):
        estimate = estimate_meta(QWEN3_8B_GGUF, weights_bytes=1, runtime="llama-server", context=8192,
                                 cache_type=cache_type)
        assert estimate.kv_cache == elements * num // 32, cache_type
    assert estimate_meta(QWEN3_8B_GGUF, weights_bytes=1, runtime="llama-server", context=8192,
                         cache_type="f32").kv_cache == elements * 4


def test_the_context_is_padded_like_llama_cpp_and_0_is_the_model_s_window():
    def context(runtime: str, asked: int) -> int:
        return estimate_meta(QWEN3_8B_GGUF, weights_bytes=1, runtime=runtime, context=asked).context

    assert context("llama-server", 1000) == 1024  # llama.cpp rounds n_ctx up to 256
    assert context("llama-server", 0) == 40960
    assert context("mlx-lm", 1000) == 1000
    assert context("mlx-lm", 0) == 32768  # MLX grows its cache: the window, bounded


def test_gemma3_sliding_window_layers_count_their_window():
    per_layer_token = 16 * 128 * 2 * 2
    assert [i for i in range(62) if i % 6 == 5] == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]  # 10 global layers
    mlx = estimate_meta(GEMMA3_27B_GGUF, weights_bytes=1, runtime="mlx-lm", context=32768)
    assert mlx.kv_cache == per_layer_token * (10 * 32768 + 52 * 1024)
    llama = estimate_meta(GEMMA3_27B_GGUF, weights_bytes=1, runtime="llama-server", context=32768)
    assert llama.kv_cache == per_layer_token * (10 * 32768 + 52 * (4 * 1024 + 512))  # 4 slots' windows + a ubatch

    config = {"model_type": "gemma3_text", "num_hidden_layers": 62, "num_attention_heads": 32,
              "num_key_value_heads": 16, "head_dim": 128, "hidden_size": 5376, "sliding_window": 1024,
              "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(62)]}
    assert estimate_meta(config, weights_bytes=1, runtime="mlx-lm", context=32768).kv_cache == mlx.kv_cache
    flags = {**GEMMA3_27B_GGUF, "gemma3.attention.sliding_window_pattern": [i % 6 != 5 for i in range(62)]}
    assert estimate_meta(flags, weights_bytes=1, runtime="mlx-lm", context=32768).kv_cache == mlx.kv_cache

    short = estimate_meta(GEMMA3_27B_GGUF, weights_bytes=1, runtime="mlx-lm", context=512)
    assert short.kv_cache == per_layer_token * 62 * 512  # a window wider than the context saves nothing
    unknown = {k: v for k, v in GEMMA3_27B_GGUF.items() if "sliding" not in k}  # what discovery records today
    assert estimate_meta(unknown, weights_bytes=1, runtime="mlx-lm", context=32768).kv_cache == \
        per_layer_token * 62 * 32768  # every layer at the full context: over, never under


def test_hybrid_layers_without_attention_keep_no_cache():
    config = {"model_type": "qwen3_next", "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 2,
              "head_dim": 256, "hidden_size": 2048,
              "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"]}
    estimate = estimate_meta(config, weights_bytes=1, runtime="mlx-lm", context=4096)
    assert estimate.kv_cache == 2 * 256 * 2 * 2 * 4096  # the one attention layer


def test_encoders_keep_no_kv_cache_but_decoder_embedders_do():
    bert = {"architecture": "bert", "layers": 12, "heads": 12, "embeddingLength": 768, "contextLength": 512,
            "task": "embedding"}
    assert estimate_meta(bert, weights_bytes=1, runtime="llama-server", context=512).kv_cache == 0
    decoder = {**QWEN3_8B_FACTS, "task": "embedding"}  # e.g. Qwen3-Embedding: llama-server allocates its cache
    assert estimate_meta(decoder, weights_bytes=1, runtime="llama-server", context=8192).kv_cache == 144 * KiB * 8192


def test_weights_from_parameters_when_only_metadata_is_known():
    estimate = estimate_meta(QWEN3_8B_FACTS, weights_bytes=0, runtime="llama-server", context=8192)
    assert estimate.weights == pytest.approx(QWEN3_8B_Q4_K_M_BYTES, rel=0.03)
    mlx = estimate_meta({**QWEN3_8B_CONFIG, "parameters": 8_190_735_360, "quantization": "4bit"}, weights_bytes=0,
                        runtime="mlx-lm", context=8192)
    assert mlx.weights == 8_190_735_360 * 9 // 16  # 4 bits plus a 16-bit scale and bias per 64
    given = estimate_meta(QWEN3_8B_FACTS, weights_bytes=123, runtime="llama-server", context=8192,
                          projector_bytes=456)
    assert (given.weights, given.projector) == (123, 456)
    assert given.to_json() == {"weights": 123, "kvCache": given.kv_cache, "projector": 456, "draft": 0,
                               "overhead": given.overhead, "context": 8192, "total": given.total}
    assert given.total == 123 + given.kv_cache + 456 + given.overhead


def test_an_unknown_cache_type_or_runtime_is_refused():
    from athanor.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="unknown KV cache type 'q3'"):
        estimate_meta(QWEN3_8B_FACTS, weights_bytes=1, runtime="llama-server", context=8192, cache_type="q3")
    with pytest.raises(InvalidValueError, match="unknown runtime 'vllm'"):
        estimate_meta(QWEN3_8B_FACTS, weights_bytes=1, runtime="vllm", context=8192)


def test_a_registered_model_counts_its_preset_projector_and_draft(cli, store, tmp_path):
    target = write_tiny_llama_gguf(tmp_path / "w" / "seeing" / "seeing-F32.gguf", context_length=4096)
    mmproj = tmp_path / "w" / "seeing" / "mmproj-seeing-f16.gguf"
    mmproj.write_bytes(b"GGUF" + bytes(4000))  # found beside the weights; llama-server would get --mmproj
    draft = write_tiny_llama_gguf(tmp_path / "w" / "draft.gguf", seed=8)
    spec = write(tmp_path / "m.yaml", "---\n".join([
        _model("drafty", draft),
        _model("seeing", target, "  draft: drafty\n  preset: {ctxSize: 1024, cacheTypeK: q8_0, flashAttn: 'on'}\n"),
    ]))
    assert cli("apply", "-f", str(spec)).returncode == 0
    doc = store.models.load()

    seeing = estimate_model(doc, doc["models"]["seeing"])
    assert seeing.weights == target.stat().st_size
    assert seeing.context == 1024
    assert seeing.kv_cache == TINY_KV_PER_TOKEN * 1024 * (34 + 64) // (2 * 64)  # K q8_0 (34/32 B), V f16 (2 B)
    assert seeing.projector == mmproj.stat().st_size
    assert seeing.draft == draft.stat().st_size + TINY_KV_PER_TOKEN * 1024  # its weights and its f16 cache
    assert seeing.total == seeing.weights + seeing.kv_cache + seeing.projector + seeing.draft + seeing.overhead
    longer = estimate_model(doc, doc["models"]["seeing"], context=4096)
    assert longer.context == 4096 and longer.kv_cache == seeing.kv_cache * 4

    drafty = estimate_model(doc, doc["models"]["drafty"])  # athanor's default: the model's window (256)
    assert (drafty.projector, drafty.draft, drafty.context) == (0, 0, 256)
    assert estimate_model(doc, {"spec": {"runtime": "llama-server"}}) == Estimate(0, 0, 0, 0, 0, context=0)


def test_headroom_grows_with_the_machine():
    assert headroom(4 * GiB) == headroom(8 * GiB) == 2 * GiB
    assert headroom(64 * GiB) == 6 * GiB
    assert headroom(128 * GiB) == headroom(1024 * GiB) == 8 * GiB
    sizes = [s * GiB for s in (8, 16, 24, 32, 48, 64, 96, 128, 192)]
    rooms = [headroom(s) for s in sizes]
    assert rooms == sorted(rooms) and 2 * GiB < headroom(16 * GiB) < headroom(36 * GiB) < 6 * GiB


SMALL = Memory(total=8 * GiB, available=5 * GiB)  # 3 GiB left for models after 2 GiB of headroom
LARGE = Memory(total=128 * GiB, available=100 * GiB)  # 92 GiB left after 8


def test_bands_on_a_small_and_a_large_machine():
    qwen3_8b = estimate_meta(QWEN3_8B_FACTS, weights_bytes=QWEN3_8B_Q4_K_M_BYTES, runtime="llama-server",
                             context=8192)
    assert 6 * GiB < qwen3_8b.total < 6.5 * GiB  # 4.7 GiB of weights, 1.1 GiB of cache at 8192, overhead
    assert band(qwen3_8b.total, SMALL) == "risky"
    assert band(qwen3_8b.total, LARGE) == "comfortable"
    assert band(2 * GiB, SMALL) == "comfortable"  # within 75% of the 3 GiB left
    assert band(int(2.5 * GiB), SMALL) == "tight"
    assert band(3 * GiB, SMALL) == "tight"
    assert band(3 * GiB + 1, SMALL) == "risky"
    assert band(1, Memory(total=8 * GiB, available=GiB)) == "risky"  # the headroom takes everything
    gemma = estimate_meta(GEMMA3_27B_GGUF, weights_bytes=16_546_688_000, runtime="llama-server", context=131072)
    assert band(gemma.total, LARGE) == "comfortable" and band(gemma.total, SMALL) == "risky"


def test_the_recommended_context_is_the_largest_comfortable_else_tight(cli, store, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", context_length=4096)
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", _model("tiny", gguf)))).returncode == 0
    doc = store.models.load()
    obj = doc["models"]["tiny"]

    def machine(budget: int) -> Memory:
        return Memory(total=8 * GiB, available=2 * GiB + budget)  # headroom 2 GiB

    def total(context: int) -> int:
        return estimate_model(doc, obj, context=context).total

    assert recommended_context(doc, obj, LARGE) == 4096  # the model's own window
    assert recommended_context(doc, obj, machine(-(-total(2048) * 4 // 3))) == 2048  # 3072 is only tight
    assert recommended_context(doc, obj, machine(total(4096))) == 4096  # nothing comfortable: the largest tight
    assert recommended_context(doc, obj, machine(total(512) - 1)) is None


VM_STAT = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                3217.
Pages active:                            227731.
Pages inactive:                          220450.
Pages speculative:                         1786.
Pages throttled:                              0.
Pages wired down:                        119645.
Pages purgeable:                           9012.
"Translation faults":                 931847239.
Pages copy-on-write:                   30126377.
Pages zero filled:                    403151093.
Pages reactivated:                      5938281.
Pages purged:                           1690823.
File-backed pages:                       122876.
Anonymous pages:                         327091.
Pages stored in compressor:              485120.
Pages occupied by compressor:            160210.
Decompressions:                         6815932.
Compressions:                          10328401.
Pageins:                                8214950.
Pageouts:                                 78436.
Swapins:                                      0.
Swapouts:                                     0.
"""


def test_macos_available_memory_from_vm_stat():
    assert parse_vm_stat(VM_STAT) == (3217 + 220450 + 1786 + 9012) * 16384
    assert parse_vm_stat("vm_stat: not what it looks like") is None


def test_this_machine_s_memory():
    import psutil

    memory = machine_memory()
    assert memory.total == psutil.virtual_memory().total
    assert 0 < memory.available <= memory.total


def test_athanor_fit_on_a_real_tiny_gguf(cli, tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", context_length=4096)
    spec = write(tmp_path / "m.yaml", _model("tiny", gguf, "  aliases: [tiny-alias]\n"
                                             "  preset: {ctxSize: 1024, cacheTypeK: q8_0, cacheTypeV: q8_0}\n"))
    assert cli("apply", "-f", str(spec)).returncode == 0

    result = cli("fit", "tiny", "-o", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    estimate = report["estimate"]
    assert (report["model"], report["runtime"]) == ("tiny", "llama-server")
    assert estimate["context"] == 1024
    assert estimate["kvCache"] == TINY_KV_PER_TOKEN * 1024 * 34 // 64  # q8_0: 34/32 of a byte, not 2
    assert estimate["weights"] == gguf.stat().st_size
    assert estimate["total"] == sum(estimate[k] for k in ("weights", "kvCache", "projector", "draft", "overhead"))
    memory = report["memory"]
    assert memory["budget"] == memory["available"] - memory["headroom"] and memory["total"] >= memory["available"]
    assert report["band"] == "comfortable"  # a few dozen MiB
    assert report["recommendedContext"] == 4096
    assert report["recommendedBand"] == "comfortable" and report["shapeKnown"] is True

    text = cli("fit", "tiny-alias", "--ctx", "2048")
    assert text.returncode == 0, text.stderr
    lines = dict(line.split(":", 1) for line in text.stdout.splitlines())
    assert lines["Context"].strip() == "2048 tokens (--ctx)"
    assert lines["KV cache"].strip() == "272.0KiB at 2048 tokens"  # 256 B a token at f16, 34/64 of it at q8_0
    assert lines["Projector"].strip() == "-" and lines["Draft"].strip() == "-"
    assert lines["Fit"].strip().startswith("comfortable (")
    assert lines["Best context"].strip() == "4096 tokens (the model's own window)"
    assert set(lines) == {"Model", "Context", "Weights", "KV cache", "Projector", "Draft", "Overhead", "Total",
                          "Memory", "Fit", "Best context"}


def test_athanor_fit_estimates_a_hub_repo_before_download(cli, fake_hub):
    result = cli("fit", "athanor-test/Mid-8B-GGUF", "-o", "json")  # Qwen3-8B's shape, listed sizes
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    estimate = report["estimate"]
    assert (report["model"], report["runtime"]) == ("athanor-test/Mid-8B-GGUF", "llama-server")
    assert estimate["weights"] == 5_030_000_000  # the Q4_K_M that pull would choose
    assert estimate["context"] == 32768  # athanor's default: the model's window (40960) up to 32768
    assert estimate["kvCache"] == 144 * KiB * 32768
    assert report["recommendedContext"] in (512, 768, *(2**k for k in range(10, 16)),
                                            *(3 * 2**k for k in range(9, 15)), 40960, None)
    head = fake_hub.requests_to("/athanor-test/Mid-8B-GGUF/resolve/", "GET")
    assert head and all(r.range for r in head), "only the header was read"
    assert not any(Path(os.environ["HF_HUB_CACHE"]).glob("models--*")), "nothing was downloaded"

    huge = cli("fit", "athanor-test/Huge-GGUF", "--ctx", "4096")
    assert huge.returncode == 0, huge.stderr
    lines = dict(line.split(":", 1) for line in huge.stdout.splitlines())
    assert lines["Model"].strip() == "athanor-test/Huge-GGUF (llama-server, Hub: Huge-Q4_K_M.gguf, not downloaded)"
    assert lines["Context"].strip() == "4096 tokens (--ctx)"
    assert lines["Fit"].strip().startswith("risky (")
    assert lines["Best context"].strip() == "none: even the smallest context is risky here"

    gated = cli("fit", "athanor-gated/Gated-Llama-GGUF")  # its file's head is behind the gate: no shape
    assert gated.returncode == 0, gated.stderr
    assert "KV cache:     unknown: the metadata does not say the model's layers and heads" in gated.stdout


def test_athanor_fit_names_what_it_cannot_estimate(cli, fake_hub):
    unknown = cli("fit", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == ["athanor: model 'nope' not found; see 'athanor get models'"]
    repo = cli("fit", "athanor-test/No-Such-GGUF")
    assert repo.returncode != 0 and len(repo.stderr.strip().splitlines()) == 1, repo.stderr
    assert "athanor-test/No-Such-GGUF" in repo.stderr and "Traceback" not in repo.stderr


def test_fit_imports_stay_light():
    code = ("import sys, athanor.fit, athanor.cli.fit_cmd; "
            "heavy = {'aiohttp', 'jinja2', 'huggingface_hub', 'jsonschema', 'psutil'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _model(name: str, weights: Path, extra: str = "") -> str:
    return (f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\nspec:\n"
            f"  runtime: llama-server\n  source: {{path: {json.dumps(str(weights))}}}\n{extra}")
