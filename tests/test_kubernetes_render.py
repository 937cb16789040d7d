"""``athanor render --target kubernetes``: the real CLI on real specs and a real HF cache layout, every manifest
checked against Kubernetes' own OpenAPI schemas (kubernetes-validate, offline, strict) for the newest minor version
it ships and the two before it; names from awkward model names; the same bytes from the same specs; the gateway's
own objects (its document in a ConfigMap, its Deployment and Service, exactly the RBAC its manager needs)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
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

from athanor import __version__
from athanor.kubernetes import rbac
from athanor.kubernetes.names import MAX_LABEL, is_label, object_name
from athanor.ports import DEFAULT_RANGE, port_is_free
from athanor.spec.validate import schema

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


GATEWAY_KINDS = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Deployment"]


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


def of_models(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The models' objects of one kind, by model name."""
    return {o["metadata"]["annotations"]["athanor.dev/model"]: o for o in objects
            if o["kind"] == kind and o["metadata"]["labels"]["app.kubernetes.io/component"] == "model"}


def of_gateway(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gateway's objects, by kind (one of each)."""
    found = [o for o in objects if o["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    assert [o["kind"] for o in found] == GATEWAY_KINDS
    return {o["kind"]: o for o in found}


def test_every_manifest_passes_the_schemas_of_three_kubernetes_versions(specs: Path) -> None:
    result = render("-f", str(specs))
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    kinds = [o["kind"] for o in objects]
    assert kinds == GATEWAY_KINDS + ["Deployment", "Service"] * (len(AWKWARD) + 2)  # every model but the stray one
    assert len(K8S_VERSIONS) == 3
    for obj in objects:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises with the path of what is wrong
    assert "model 'stray' left out" in result.stderr and "not under spec.kubernetes.models.root" in result.stderr


def test_awkward_names_give_valid_distinct_stable_names(specs: Path) -> None:
    objects = list(yaml.safe_load_all(render("-f", str(specs)).stdout))
    deployments = of_models(objects, "Deployment")
    names = {model: d["metadata"]["name"] for model, d in deployments.items()}
    assert set(AWKWARD) <= set(names)
    assert len(set(names.values())) == len(names), "two models never share a name"
    assert all(is_label(name) for name in names.values())
    assert names["tiny-model-q4"] == "athanor-tiny-model-q4"  # a name that fits is kept as written
    assert names["tiny.model_q4"].startswith("athanor-tiny-model-q4-")  # changed, so it carries its hash
    assert len(names[LONG]) == MAX_LABEL and names[LONG] != names[LONG[:-1] + "y"]
    services = {o["metadata"]["name"] for o in of_models(objects, "Service").values()}
    assert services == set(names.values())
    for name in ("Qwen3.5_Coder", "qwen3-5-coder", "ÜBER-modell", "x" * 200, "...", "7b"):  # beyond model names
        made = object_name("athanor", name)
        assert is_label(made) and made == object_name("athanor", name)
    assert object_name("athanor", "Qwen3.5_Coder") != object_name("athanor", "qwen3-5-coder")


def test_the_runtime_runs_as_athanor_would_start_it_on_the_models_volume(specs: Path, tmp_path: Path) -> None:
    objects = list(yaml.safe_load_all(render("-f", str(specs)).stdout))
    by_model = of_models(objects, "Deployment")
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
    first = render("-f", str(specs))
    with socket.socket() as squatter:  # the port this machine would give the first model is taken now
        squatter.bind(("127.0.0.1", next(p for p in range(*DEFAULT_RANGE) if port_is_free(p))))
        squatter.listen()
        second = render("-f", str(specs))
    assert first.returncode == 0 and first.stdout == second.stdout
    out = tmp_path / "manifests"
    assert render("-f", str(specs), "-o", str(out)).returncode == 0
    written = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert render("-f", str(specs), "-o", str(out)).returncode == 0
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == written
    kustomization = yaml.safe_load(written["kustomization.yaml"])
    assert kustomization["namespace"] == "llm"
    assert kustomization["resources"][0] == "gateway.yaml"
    assert [o["kind"] for o in yaml.safe_load_all(written["gateway.yaml"])] == GATEWAY_KINDS
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


def test_the_gateway_runs_in_the_cluster_with_exactly_the_rights_its_manager_needs(specs: Path) -> None:
    result = render("-f", str(specs))
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    gateway = of_gateway(objects)
    assert all(o["metadata"]["namespace"] == "llm" for o in objects)
    role, binding = gateway["Role"], gateway["RoleBinding"]
    assert [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]] == [
        ([group], [resource], list(verbs)) for group, resource, verbs in rbac.RULES]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": gateway["ServiceAccount"]["metadata"]["name"],
                                    "namespace": "llm"}]

    deployment = gateway["Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == gateway["ServiceAccount"]["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    (container,) = pod["containers"]
    assert container["name"] == "gateway" and container["image"] == f"athanor-gateway:{__version__}"
    assert container["command"] == ["athanor", "serve", "--listen", "0.0.0.0:8080"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ATHANOR_HOME"] == "/var/lib/athanor" and env["ATHANOR_SERVICE_MANAGER"] == "kubernetes"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["config"]["configMap"]["name"] == gateway["ConfigMap"]["metadata"]["name"]
    assert mounts["config"]["readOnly"] and mounts["state"]["mountPath"] == env["ATHANOR_HOME"]
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    (seed,) = pod["initContainers"]
    assert seed["name"] == "seed-store" and seed["image"] == container["image"]
    assert seed["command"] == ["cp", mounts["config"]["mountPath"] + "/models.json",
                               env["ATHANOR_HOME"] + "/models.json"]
    assert {m["name"] for m in seed["volumeMounts"]} == {"config", "state"}
    assert container["readinessProbe"]["httpGet"] == container["livenessProbe"]["httpGet"] == {
        "path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]

    # The gateway presents the key the runtimes check: the same Secret, the same file.
    key_file = PurePosixPath(env["ATHANOR_RUNTIME_KEY_FILE"])
    assert mounts["runtime-key"]["mountPath"] == str(key_file.parent) and mounts["runtime-key"]["readOnly"]
    for name, model_deployment in of_models(objects, "Deployment").items():
        model_pod = model_deployment["spec"]["template"]["spec"]
        runtime = model_pod["containers"][0]
        assert volumes["runtime-key"]["secret"] == next(v["secret"] for v in model_pod["volumes"]
                                                        if v["name"] == "runtime-key"), name
        if runtime["image"].startswith("ghcr.io/ggml-org/llama.cpp"):
            assert runtime["args"][runtime["args"].index("--api-key-file") + 1] == str(key_file), name
        model_mounts = {m["name"]: m["mountPath"] for m in runtime["volumeMounts"]}
        assert model_mounts["runtime-key"] == mounts["runtime-key"]["mountPath"], name
        assert model_pod["terminationGracePeriodSeconds"] == 10  # athanor's stop timeout: a bounded grace

    service = gateway["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    selector = service["spec"]["selector"]
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    model_pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_models(objects, "Deployment").values()]
    assert not any(selector.items() <= labels.items() for labels in model_pods)  # it never selects a model's pod


def test_the_gateway_serves_the_rendered_models_from_its_configmap(specs: Path) -> None:
    objects = list(yaml.safe_load_all(render("-f", str(specs)).stdout))
    gateway = of_gateway(objects)
    text = gateway["ConfigMap"]["data"]["models.json"]
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    assert set(doc["models"]) == set(of_models(objects, "Deployment"))  # every rendered model; not the stray one
    assert all(doc["models"][name]["artifact"]["sizeBytes"] > 0 for name in doc["models"])  # facts from here
    assert {obj["spec"]["port"] for obj in doc["models"].values()} == {8080}  # the pods' port, not a free one here
    spec = doc["gateway"]["spec"]
    assert spec["serviceManager"] == "kubernetes"
    assert spec["listen"] == "0.0.0.0:8080" and spec["discovery"] == {"hfCache": False, "paths": []}
    assert {"athanor-gateway", "athanor-gateway.llm", "athanor-gateway.llm.svc",
            "athanor-gateway.llm.svc.cluster.local"} <= set(spec["allowedHosts"])  # the Service's names are served
    assert "creationTimestamp" not in text  # no times: the same specs give the same bytes
    jsonschema.Draft202012Validator(schema()).validate(
        {"apiVersion": doc["gateway"]["apiVersion"], "kind": "Gateway",
         "metadata": {"name": doc["gateway"]["metadata"]["name"]}, "spec": spec})  # a Gateway athanor accepts
    template = gateway["Deployment"]["spec"]["template"]["metadata"]
    assert template["annotations"]["athanor.dev/models-sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_the_gateway_settings_and_its_ollama_address(home: Path, tmp_path: Path) -> None:
    spec = write(tmp_path / "gateway.yaml", """apiVersion: athanor.dev/v1alpha1
kind: Gateway
metadata: {name: default}
spec:
  listen: 127.0.0.1:9000
  ollama: {listen: "127.0.0.1:11434"}
  allowedHosts: [llm.example.org]
  kubernetes:
    images: {athanor: registry.example/athanor:1}
    runtimeKeySecret: my-key
""")
    result = render("-f", str(spec))
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    gateway = of_gateway(objects)  # no models: the gateway all the same
    for obj in objects:
        assert obj["metadata"]["namespace"] == "athanor"
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    pod = gateway["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == pod["initContainers"][0]["image"] == "registry.example/athanor:1"
    assert {"name": "ollama", "containerPort": 11434} in container["ports"]
    assert {"name": "ollama", "port": 11434, "targetPort": "ollama", "protocol": "TCP"} in \
        gateway["Service"]["spec"]["ports"]
    assert next(v for v in pod["volumes"] if v["name"] == "runtime-key")["secret"] == {"secretName": "my-key",
                                                                                       "defaultMode": 0o400}
    served = json.loads(gateway["ConfigMap"]["data"]["models.json"])["gateway"]["spec"]
    assert served["ollama"]["listen"] == "0.0.0.0:11434"  # on the pod's address, where the Service reaches it
    assert served["allowedHosts"][0] == "llm.example.org" and "athanor-gateway.athanor.svc" in served["allowedHosts"]

    colliding = write(tmp_path / "colliding.yaml", spec.read_text().replace("11434", "8080"))
    result = render("-f", str(colliding))
    assert result.returncode == 0, result.stderr
    gateway = of_gateway(list(yaml.safe_load_all(result.stdout)))
    assert [p["name"] for p in gateway["Service"]["spec"]["ports"]] == ["http"]
    assert "listen" not in json.loads(gateway["ConfigMap"]["data"]["models.json"])["gateway"]["spec"]["ollama"]
    assert "spec.ollama.listen" in result.stderr and "left out" in result.stderr


def test_a_document_too_large_for_a_configmap_is_refused(specs: Path, tmp_path: Path) -> None:
    padded = write(tmp_path / "padded.yaml", model("padded", "{hf: {repo: org/Tiny-GGUF, file: Tiny-Q4_K_M.gguf}}",
                                                   extra=f"  env: {{PADDING: {'x' * 600_000}}}\n"))
    result = render("-f", str(specs), "-f", str(padded))  # the env is in the spec and in its last-applied record
    assert result.returncode == 1
    assert "ConfigMap athanor-gateway" in result.stderr and "1 MiB" in result.stderr
    assert result.stdout == ""


def test_names_the_schema_would_refuse_still_make_valid_distinct_stable_labels():
    """Model names are [a-z0-9._-] up to 63 today; the names function does not count on it: upper case, 80
    characters, non-ASCII, nothing left after cleaning, and names that clean to the same text."""
    from athanor.kubernetes.names import is_label, object_name

    names = ["Qwen3.5_Coder", "qwen3-5-coder", "Q" * 80, "Q" * 79 + "R", "Café-crème", "cafe-creme", "模型", "混合"]
    made = [object_name("athanor", name) for name in names]
    assert all(is_label(name) for name in made), made
    assert len(set(made)) == len(made), made
    assert made == [object_name("athanor", name) for name in names]  # stable
    assert made[4].startswith("athanor-cafe-creme-")  # what can be read of the name is kept
