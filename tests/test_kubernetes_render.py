"""``athanor render --target kubernetes``: the real CLI on real specs and a real HF cache layout, every manifest
checked against Kubernetes' own OpenAPI schemas (kubernetes-validate, offline, strict) for the newest minor version
it ships and the two before it; names from awkward model names; the same bytes from the same specs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ATHANOR, write
from fixtures.tiny_models import (
    TinyLlamaShape,
    make_hf_cache,
    write_tiny_llama_gguf,
    write_tiny_mlx_llama,
    write_tiny_mmproj_gguf,
)

from athanor.kubernetes.names import MAX_LABEL, is_label, object_name

K8S_VERSIONS = sorted({v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()},
                      key=lambda v: tuple(int(p) for p in v.split(".")))[-3:]
LONG = "m" * 30 + "." + "x" * 32  # 63 characters: a valid model name that no longer fits with the prefix
AWKWARD = ["tiny.model_q4", "tiny-model-q4", "9lives", LONG, LONG[:-1] + "y", "a_b.c-d"]
GATEWAY = """apiVersion: athanor.dev/v1alpha1
kind: Gateway
metadata: {name: default}
spec:
  kubernetes:
    namespace: llm
    models: {claim: model-weights, root: %(root)s}
    images: {mlx-lm: registry.example/mlx-lm:0.32}
    hfTokenSecret: {name: hf-token}
    gpu: {resource: nvidia.com/gpu}
    nodeSelector: {accelerator: gpu}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
"""


def model(name: str, source: str, runtime: str = "llama-server", extra: str = "") -> str:
    return (f"---\napiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {json.dumps(name)}}}\nspec:\n"
            f"  runtime: {runtime}\n  source: {source}\n{extra}")


@pytest.fixture
def specs(home: Path, hf_root: Path, tmp_path: Path) -> Path:
    """A Gateway placing models on a cluster, GGUFs by path under its volume's root (awkward names among them, one
    with a projector), one by path outside it, a GGUF and an MLX model from the HF cache, and a pinned CPU model."""
    weights = tmp_path / "weights"
    for name in AWKWARD:
        write_tiny_llama_gguf(weights / f"{name}.gguf", name=name[:20])
    write_tiny_mmproj_gguf(weights / "mmproj-tiny.model_q4.gguf", text_embedding_length=TinyLlamaShape.hidden)
    outside = write_tiny_llama_gguf(tmp_path / "elsewhere" / "stray.gguf")
    mlx = write_tiny_mlx_llama(tmp_path / "mlx-files", quantized_bits=4)
    make_hf_cache(hf_root, {"org/Tiny-GGUF": {"Tiny-Q4_K_M.gguf": write_tiny_llama_gguf},
                            "mlx-community/Tiny-4bit": {str(p.relative_to(mlx)): p for p in sorted(mlx.rglob("*"))
                                                        if p.is_file()}})
    docs = [GATEWAY % {"root": json.dumps(str(weights))}]
    docs += [model(name, f"{{path: {json.dumps(str(weights / f'{name}.gguf'))}}}",
                   extra="  preset: {ctxSize: 2048}\n") for name in AWKWARD]
    docs.append(model("stray", f"{{path: {json.dumps(str(outside))}}}"))
    docs.append(model("hub-gguf", "{hf: {repo: org/Tiny-GGUF, file: Tiny-Q4_K_M.gguf}}",
                      extra="  kubernetes: {nodeSelector: {zone: a}, gpu: {resource: amd.com/gpu, count: 2}}\n"))
    docs.append(model("hub-mlx", "{hf: {repo: mlx-community/Tiny-4bit}}", runtime="mlx-lm"))
    return write(tmp_path / "specs" / "models.yaml", "\n".join(docs))


def render(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ATHANOR, "render", "--target", "kubernetes", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)


def test_every_manifest_passes_the_schemas_of_three_kubernetes_versions(specs: Path) -> None:
    result = render("-f", str(specs))
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    kinds = [o["kind"] for o in objects]
    assert kinds == ["Deployment", "Service"] * (len(AWKWARD) + 2)  # every model but the stray one
    assert len(K8S_VERSIONS) == 3
    for obj in objects:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises with the path of what is wrong
    assert "model 'stray' left out" in result.stderr and "not under spec.kubernetes.models.root" in result.stderr


def test_awkward_names_give_valid_distinct_stable_names(specs: Path) -> None:
    objects = list(yaml.safe_load_all(render("-f", str(specs)).stdout))
    deployments = {o["metadata"]["annotations"]["athanor.dev/model"]: o for o in objects if o["kind"] == "Deployment"}
    names = {model: d["metadata"]["name"] for model, d in deployments.items()}
    assert set(AWKWARD) <= set(names)
    assert len(set(names.values())) == len(names), "two models never share a name"
    assert all(is_label(name) for name in names.values())
    assert names["tiny-model-q4"] == "athanor-tiny-model-q4"  # a name that fits is kept as written
    assert names["tiny.model_q4"].startswith("athanor-tiny-model-q4-")  # changed, so it carries its hash
    assert len(names[LONG]) == MAX_LABEL and names[LONG] != names[LONG[:-1] + "y"]
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    assert services == set(names.values())
    for name in ("Qwen3.5_Coder", "qwen3-5-coder", "ÜBER-modell", "x" * 200, "...", "7b"):  # beyond model names
        made = object_name("athanor", name)
        assert is_label(made) and made == object_name("athanor", name)
    assert object_name("athanor", "Qwen3.5_Coder") != object_name("athanor", "qwen3-5-coder")


def test_the_runtime_runs_as_athanor_would_start_it_on_the_models_volume(specs: Path, tmp_path: Path) -> None:
    objects = list(yaml.safe_load_all(render("-f", str(specs)).stdout))
    by_model = {o["metadata"]["annotations"]["athanor.dev/model"]: o for o in objects if o["kind"] == "Deployment"}
    local = by_model["tiny.model_q4"]
    pod = local["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:2] == ["--model", "/models/tiny.model_q4.gguf"]
    assert args[args.index("--mmproj") + 1] == "/models/mmproj-tiny.model_q4.gguf"  # found beside the weights
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8080"
    assert args[args.index("--ctx-size") + 1] == "2048"  # the preset, through the same builder
    assert args[args.index("--api-key-file") + 1] == "/etc/athanor/runtime-key/key"
    assert "--slot-save-path" not in args
    assert local["spec"]["replicas"] == 0 and local["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["volumes"][0] == {"name": "models", "persistentVolumeClaim": {"claimName": "model-weights",
                                                                              "readOnly": True}}
    assert pod["nodeSelector"] == {"accelerator": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    resources = pod["containers"][0]["resources"]
    request = int(resources["requests"]["memory"].removesuffix("Mi"))
    limit = int(resources["limits"]["memory"].removesuffix("Mi"))
    assert 0 < request < limit and resources["limits"]["nvidia.com/gpu"] == 1
    hub = by_model["hub-gguf"]["spec"]["template"]["spec"]
    fetch = hub["initContainers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in fetch["env"]}
    assert env["HF_REPO"] == "org/Tiny-GGUF" and json.loads(env["HF_PATTERNS"]) == ["Tiny-Q4_K_M.gguf"]
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert hub["containers"][0]["args"][1] == env["TARGET_DIR"] + "/Tiny-Q4_K_M.gguf"
    assert hub["nodeSelector"] == {"zone": "a"} and hub["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 2
    mlx = by_model["hub-mlx"]["spec"]["template"]["spec"]["containers"][0]
    assert mlx["image"] == "registry.example/mlx-lm:0.32"
    startup = local["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 120  # minutes for a large model, never less


def test_two_renders_give_the_same_bytes_and_a_directory_for_kubectl(specs: Path, tmp_path: Path) -> None:
    first, second = render("-f", str(specs)), render("-f", str(specs))
    assert first.returncode == 0 and first.stdout == second.stdout
    out = tmp_path / "manifests"
    assert render("-f", str(specs), "-o", str(out)).returncode == 0
    written = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert render("-f", str(specs), "-o", str(out)).returncode == 0
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == written
    kustomization = yaml.safe_load(written["kustomization.yaml"])
    assert kustomization["namespace"] == "llm"
    assert sorted(kustomization["resources"]) == sorted(n for n in written if n != "kustomization.yaml")
    streamed = list(yaml.safe_load_all(first.stdout))
    from_files = [o for name in kustomization["resources"] for o in yaml.safe_load_all(written[name])]
    assert sorted(json.dumps(o, sort_keys=True) for o in from_files) == sorted(json.dumps(o, sort_keys=True)
                                                                                for o in streamed)


def test_a_bad_kubernetes_setting_is_refused_with_where_and_what(home: Path, tmp_path: Path) -> None:
    spec = write(tmp_path / "bad.yaml", GATEWAY.replace("namespace: llm", "namespace: Not_A_Label") % {"root": "/x"})
    result = render("-f", str(spec))
    assert result.returncode != 0
    assert "bad.yaml:6" in result.stderr and "namespace" in result.stderr and "DNS label" in result.stderr
