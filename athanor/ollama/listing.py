"""What Ollama clients are told about models: ``/api/tags``, ``/api/ps`` and ``/api/show``, from the registry,
the controller's instances and the fit estimate.

Names are listed as ``NAME:latest`` (Ollama lists untagged models so, and clients send the name back as listed).
Sizes are bytes. ``details`` come from discovery (format, family, parameter count, quantization). For a loaded
model, ``size`` and ``size_vram`` are the fit estimate of what it holds at its served context (``size_vram`` is
all of it on Apple silicon, whose GPU shares the memory, and 0 elsewhere, where athanor's runtimes run on the
CPU unless a preset offloads). ``context_length``, in ``/api/ps`` and as ``<arch>.context_length`` in
``/api/show``'s ``model_info``, is the context the model is served with, which is what a client can use (VS Code
Copilot sizes its prompts by it), not the longest the weights were trained for.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from athanor import fit, views
from athanor.controller.instance import Phase
from athanor.ollama.shapes import tagged
from athanor.timestamps import utc_timestamp

if TYPE_CHECKING:
    from athanor.controller.controller import Controller

NEVER = "2318-01-01T00:00:00Z"  # expires_at of a model kept loaded for ever (Ollama shows a far-future time too)
TOOL_MARKERS = ("tools", "tool_call")  # a chat template that renders tools mentions them
LOADED = (Phase.READY, Phase.DRAINING)
_PARAMETERS = (("ctxSize", "num_ctx"), ("temperature", "temperature"), ("topP", "top_p"), ("topK", "top_k"),
               ("minP", "min_p"), ("repeatPenalty", "repeat_penalty"), ("seed", "seed"), ("maxTokens", "num_predict"),
               ("nPredict", "num_predict"))


def published(controller: Controller) -> dict[str, dict[str, Any]]:
    """The models Ollama clients may see: published, not disabled, with weights on disk."""
    return {name: obj for name, obj in sorted(controller.doc()["models"].items())
            if obj["spec"].get("residency") != "disabled" and obj["spec"].get("publish", True) and obj.get("artifact")}


def details(obj: dict[str, Any]) -> dict[str, Any]:
    artifact = obj.get("artifact") or {}
    meta = artifact.get("metadata") or {}
    family = meta.get("architecture") or meta.get("modelType") or ""
    return {"parent_model": "", "format": artifact.get("format") or "", "family": family,
            "families": [family] if family else None,
            "parameter_size": views.human_count(meta.get("parameters")) if meta.get("parameters") else "",
            "quantization_level": meta.get("quantization") or ""}


def digest(obj: dict[str, Any]) -> str:
    """A stable id of the weights as discovered (Ollama's is its manifest's sha256): the same files, the same id."""
    artifact = obj.get("artifact") or {}
    identity = [obj["spec"].get("source"), artifact.get("path"), artifact.get("sizeBytes"), artifact.get("revision")]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def modified_at(obj: dict[str, Any]) -> str:
    """When the weights last changed on disk (else when the model was registered)."""
    path = (obj.get("artifact") or {}).get("path")
    try:
        return utc_timestamp(os.stat(path).st_mtime) if path else obj["metadata"].get("creationTimestamp") or ""
    except OSError:
        return obj["metadata"].get("creationTimestamp") or ""


def tag_entry(name: str, obj: dict[str, Any]) -> dict[str, Any]:
    listed = tagged(name)
    return {"name": listed, "model": listed, "modified_at": modified_at(obj),
            "size": (obj.get("artifact") or {}).get("sizeBytes") or 0, "digest": digest(obj),
            "details": details(obj)}


def tags(controller: Controller) -> dict[str, Any]:
    return {"models": [tag_entry(name, obj) for name, obj in published(controller).items()]}


def ps(controller: Controller) -> dict[str, Any]:
    doc = controller.doc()
    models = []
    for name, inst in sorted(controller.instances.items()):
        obj = doc["models"].get(name)
        if obj is None or inst.phase not in LOADED:
            continue
        estimate = fit.estimate_model(doc, obj)
        limit = controller.idle_limit(inst, obj)
        if limit is None:
            expires = NEVER
        else:
            expires = utc_timestamp(time.time() + max(inst.last_used + limit - time.monotonic(), 0.0))
        entry = tag_entry(name, obj)
        del entry["modified_at"]
        models.append({**entry, "expires_at": expires, "size": estimate.total,
                       "size_vram": estimate.total if _unified_gpu() else 0, "context_length": estimate.context})
    return {"models": models}


def _unified_gpu() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def show(doc: dict[str, Any], name: str, obj: dict[str, Any]) -> dict[str, Any]:
    """``/api/show`` for one model. Reads the weights' header (GGUF) or config (MLX) for the template and the
    model's own keys: call it off the event loop."""
    from athanor.runtimes.resolve import effective_for

    artifact = obj.get("artifact") or {}
    meta = artifact.get("metadata") or {}
    effective = {key: value.value for key, value in effective_for(doc, obj).items()}
    context = fit.estimate_model(doc, obj).context
    template, model_info = _read_weights(artifact, meta)
    template = _preset_template(effective) or template
    arch = model_info.get("general.architecture") or meta.get("architecture") or meta.get("modelType") or "unknown"
    model_info["general.architecture"] = arch
    model_info.setdefault("general.basename", name)
    if meta.get("parameters"):
        model_info["general.parameter_count"] = meta["parameters"]
    if context:
        model_info[f"{arch}.context_length"] = context
    parameters = "\n".join(f"{ollama_key:<30} {effective[key]}" for key, ollama_key in _PARAMETERS
                           if effective.get(key) not in (None, ""))
    return {
        "license": "",
        "modelfile": f"# athanor serves {name!r} ({views.source_text(obj['spec']['source'])}) on "
                     f"{obj['spec']['runtime']}; its preset, not a Modelfile, sets how it runs "
                     f"(athanor describe model {name})\n",
        "parameters": parameters,
        "template": template or "",
        "details": details(obj),
        "model_info": model_info,
        "capabilities": capabilities(artifact, template),
        "modified_at": modified_at(obj),
    }


def capabilities(artifact: dict[str, Any], template: str | None) -> list[str]:
    """Ollama's capability names: ``embedding`` for an embedding model; otherwise ``completion``, plus ``tools``
    when the chat template renders tools, ``vision`` and ``thinking`` where discovery found them."""
    found = artifact.get("capabilities") or []
    if "embedding" in found or "rerank" in found:
        return ["embedding"]
    out = ["completion"]
    if template and any(marker in template for marker in TOOL_MARKERS):
        out.append("tools")
    if "vision" in found:
        out.append("vision")
    if "reasoning" in found:
        out.append("thinking")
    return out


def _read_weights(artifact: dict[str, Any], meta: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(chat template, model_info) read from the weights: a GGUF's own keys (scalars, and short arrays; the
    tokenizer's long arrays are left out, as Ollama leaves them out unless asked), or an MLX config's facts under
    GGUF's key names."""
    path = artifact.get("path")
    if not path:
        return None, {}
    if artifact.get("format") == "gguf":
        from athanor.discovery.gguf import GGUFError, read_gguf_metadata

        try:
            info = read_gguf_metadata(path)
        except (GGUFError, OSError):
            return None, {}
        model_info = {key: value for key, value in info.kv.items()
                      if isinstance(value, (str, int, float, bool, list)) and key != "tokenizer.chat_template"}
        return info.chat_template, model_info
    from athanor.discovery.mlx import read_chat_template

    arch = meta.get("modelType") or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch}
    for key, name in (("layers", "block_count"), ("heads", "attention.head_count"),
                      ("kvHeads", "attention.head_count_kv"), ("hiddenSize", "embedding_length")):
        if meta.get(key) is not None:
            model_info[f"{arch}.{name}"] = meta[key]
    return read_chat_template(Path(path)), model_info


def _preset_template(effective: dict[str, Any]) -> str | None:
    """A chat template the model's preset puts in place of its own (a file, or Jinja text)."""
    path = effective.get("chatTemplateFile")
    if path:
        try:
            return Path(os.path.expanduser(path)).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    text = effective.get("chatTemplate")
    return text if isinstance(text, str) and "{" in text else None
