"""The tiny BERT embedding and reranking GGUFs of fixtures/tiny_models.py: what the files carry, and the real
llama-server loading them and answering /v1/embeddings and /v1/rerank."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import pytest
from fixtures.llama_direct import LlamaServer
from fixtures.tiny_models import wordpiece_vocab, write_tiny_bert_gguf, write_tiny_reranker_gguf



def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


# ---------------------------------------------------------------------------------------------- the files


def test_bert_gguf_metadata(tmp_path: Path) -> None:
    path = write_tiny_bert_gguf(tmp_path / "bert.gguf", embedding_length=48)
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "bert"
    assert field(reader, "bert.pooling_type") == gguf.PoolingType.MEAN == 1
    assert field(reader, "bert.attention.causal") is False
    assert field(reader, "bert.embedding_length") == 48
    assert field(reader, "bert.context_length") == 128
    assert field(reader, "bert.block_count") == 2
    assert field(reader, "bert.attention.head_count") == 2
    assert field(reader, "bert.feed_forward_length") == 64
    assert math.isclose(field(reader, "bert.attention.layer_norm_epsilon"), 1e-12, rel_tol=1e-6)
    assert "bert.classifier.output_labels" not in reader.fields

    assert field(reader, "tokenizer.ggml.model") == "bert"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(wordpiece_vocab()) == field(reader, "bert.vocab_size")
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "\u2581hello" in tokens and "ing" in tokens  # llama.cpp's spelling of "hello" and "##ing"
    assert [tokens[field(reader, f"tokenizer.ggml.{key}")] for key in (
        "bos_token_id", "eos_token_id", "seperator_token_id", "padding_token_id", "unknown_token_id", "mask_token_id",
    )] == ["[CLS]", "[SEP]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:5] == [gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, *[gguf.TokenType.CONTROL] * 3]
    assert set(types[5:]) == {gguf.TokenType.NORMAL}

    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "token_types.weight", "position_embd.weight",
                "token_embd_norm.weight", "token_embd_norm.bias"}
    for i in range(2):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
                     "layer_output_norm"):
            expected |= {f"blk.{i}.{part}.weight", f"blk.{i}.{part}.bias"}
    assert set(tensors) == expected
    assert tensors["token_embd.weight"].shape.tolist() == [48, len(tokens)]  # GGUF order: (n_embd, n_vocab)
    assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [48, 64]
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert path.stat().st_size < 1 << 20


def test_reranker_gguf_metadata(tmp_path: Path) -> None:
    path = write_tiny_reranker_gguf(tmp_path / "reranker.gguf")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "bert"
    assert field(reader, "bert.pooling_type") == gguf.PoolingType.RANK == 4
    assert field(reader, "bert.attention.causal") is False
    assert field(reader, "bert.classifier.output_labels") == ["LABEL_0"]
    tensors = {t.name: t.shape.tolist() for t in reader.tensors}
    assert tensors["cls.weight"] == [32, 32] and tensors["cls.bias"] == [32]
    assert tensors["cls.output.weight"] == [32, 1] and tensors["cls.output.bias"] == [1]
    bert = {t.name for t in gguf.GGUFReader(write_tiny_bert_gguf(tmp_path / "bert.gguf")).tensors}
    assert set(tensors) - bert == {"cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias"}
    assert path.stat().st_size < 1 << 20


def test_models_are_deterministic(tmp_path: Path) -> None:
    for write in (write_tiny_bert_gguf, write_tiny_reranker_gguf):
        first = write(tmp_path / "a" / "m.gguf").read_bytes()
        assert write(tmp_path / "b" / "m.gguf").read_bytes() == first
        assert write(tmp_path / "c" / "m.gguf", seed=1).read_bytes() != first


# ---------------------------------------------------------------------------------------------- served


@pytest.mark.parametrize("embedding_length", [32, 48])
def test_llama_server_embeds_with_the_tiny_bert(tmp_path: Path, llama_server: LlamaServer, embedding_length: int) -> None:
    model = write_tiny_bert_gguf(tmp_path / "bert.gguf", embedding_length=embedding_length)
    proc, url, log = llama_server(model, "--embeddings")
    assert proc.poll() is None, log.read_text()
    body = post(f"{url}/v1/embeddings", {"input": ["hello world", "the cat sat on the mat."]})
    vectors = [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]
    assert [len(v) for v in vectors] == [embedding_length, embedding_length]
    for vector in vectors:  # llama-server L2-normalises pooled embeddings
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    assert vectors[0] != vectors[1]
    # [CLS] hello world [SEP] + [CLS] the cat sat on the mat . [SEP]: the WordPiece tokenizer and its specials
    assert body["usage"]["prompt_tokens"] == 4 + 9


def test_llama_server_reranks_with_the_tiny_reranker(tmp_path: Path, llama_server: LlamaServer) -> None:
    model = write_tiny_reranker_gguf(tmp_path / "reranker.gguf")
    proc, url, log = llama_server(model, "--reranking")
    assert proc.poll() is None, log.read_text()
    documents = ["paris is the capital of france.", "the cat sat on the mat.", "hello world"]
    body = post(f"{url}/v1/rerank", {"query": "what is the capital of france?", "documents": documents})
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)  # best first
    assert len(set(scores)) == 3  # each pair went through the model: random weights, distinct scores
    # [CLS] query(7) [SEP] document [SEP] per document: the cross-encoder pair format
    assert body["usage"]["prompt_tokens"] == sum(3 + 7 + n for n in (7, 7, 2))
