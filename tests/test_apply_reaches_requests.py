"""An ``apply`` reaches a running daemon at once: a request sent after the CLI returned sees the change, through the
real gateway and the real CLI, round after round (each request looks at models.json: ``controller/desired.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures.serving import Gateway, apply_gateway, apply_models, model_spec
from fixtures.tiny_models import write_tiny_llama_gguf


def test_each_request_sees_the_apply_that_finished_before_it_was_sent(gateway: Gateway, tmp_path: Path):
    """Through the real gateway and the real CLI: the body limit and a new model, each changed by an ``apply``
    that returned just before the request was sent, apply to that request."""
    body = json.dumps({"model": "nothing-yet", "prompt": "x" * 4000}).encode()
    gguf = write_tiny_llama_gguf(tmp_path / "late.gguf")
    for i in range(6):
        apply_gateway(gateway, tmp_path, "  limits: {maxRequestBytes: 1024}\n")
        status, answer = gateway.post("/v1/completions", body)
        assert status == 413, answer
        apply_gateway(gateway, tmp_path, "  limits: {maxRequestBytes: 100000}\n")
        status, answer = gateway.post("/v1/completions", body)
        assert status == 404 and answer["error"]["code"] == "model_not_found", answer

        name = f"late-{i}"
        apply_models(tmp_path / f"{name}.yaml", model_spec(name, gguf, extra="  residency: disabled\n"))
        status, answer = gateway.post("/v1/completions", json.dumps({"model": name, "prompt": "hi"}).encode())
        assert status == 503 and "disabled" in answer["error"]["message"], answer
