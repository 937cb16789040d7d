"""The desired state as plain Kubernetes objects: per model, a Deployment at zero replicas and a ClusterIP Service;
before them, the gateway that scales them (``gateway.py``).

Nothing here is Kubernetes-only knowledge of a model: the runtime's arguments come from the same launch builder
the local managers use (``runtimes/launch.py``), with the weights' paths mapped onto the model volume and the
runtime listening on the pod's address instead of loopback; the memory request is athanor's fit estimate at the
served context (the limit a margin above it); the startup probe's budget grows with the weights' size, since a
large model loads for minutes. What a cluster adds comes from the Gateway's ``spec.kubernetes`` (the namespace,
images, the models' volume, GPU resource names, node selection), overridden per model by the model's own.

Weights: a model pulled from the Hub is fetched by an init container (huggingface_hub, ``HF_TOKEN`` from a Secret
when one is named) onto the models volume, a PersistentVolumeClaim when ``models.claim`` names one (fetched once,
kept), else an emptyDir (fetched at every start). A model from a local path is served from the claim, where the
path must lie under ``models.root`` (the directory the claim holds). A model that cannot be placed is left out,
with the reason.

Every object is built as plain data in a fixed order, so the same specs give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from athanor import catalog, fit
from athanor.controller.stopping import STOP_TIMEOUT_S
from athanor.kubernetes.names import label_value, object_name
from athanor.quantities import GIB
from athanor.runtimes.args import effective_args, effective_env
from athanor.runtimes.launch import GUARD_SCRIPT, LOOPBACK, RUNTIMES, Target, launch_spec
from athanor.runtimes.resolve import effective_for

PORT = 8080
MODELS_MOUNT = "/models"
KEY_MOUNT = "/etc/athanor/runtime-key"
KEY_FILE = f"{KEY_MOUNT}/key"
PREFIX = "athanor"
DEFAULT_NAMESPACE = "athanor"
DEFAULT_IMAGES = {"llama-server": "ghcr.io/ggml-org/llama.cpp:server", "downloader": "python:3.12-slim"}
DEFAULT_KEY_SECRET = "athanor-runtime-key"
LIMIT_FACTOR = 1.25  # the memory limit over the fit estimate: headroom for what the estimate leaves out
PROBE_PERIOD_S = 5
STARTUP_BASE_S = 120  # the startup probe's budget: this much, plus STARTUP_PER_GIB_S per GiB of weights
STARTUP_PER_GIB_S = 60
MLX_PATTERNS = ("*.safetensors", "*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
                "*.jsonl", "*.jinja")
# Runs in the init container: a fixed program; what to fetch comes in its environment, never in its code.
DOWNLOAD = (
    "import json, os, subprocess, sys\n"
    "try:\n"
    "    import huggingface_hub\n"
    "except ImportError:\n"
    "    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-cache-dir',\n"
    "                    'huggingface_hub>=0.30'], check=True)\n"
    "from huggingface_hub import snapshot_download\n"
    "snapshot_download(os.environ['HF_REPO'], revision=os.environ.get('HF_REVISION') or None,\n"
    "                  allow_patterns=json.loads(os.environ['HF_PATTERNS']) or None,\n"
    "                  local_dir=os.environ['TARGET_DIR'])\n"
)
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


@dataclass
class Rendered:
    """What a render produced: the objects in order (the gateway's, then the models'), per model, the gateway's,
    and the models left out with why."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    by_model: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    gateway: list[dict[str, Any]] = field(default_factory=list)  # athanor itself, serving the models (gateway.py)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def render(doc: dict[str, Any]) -> Rendered:
    """Every served model of ``doc`` (models.json's shape, artifacts included) as Kubernetes objects, after the
    gateway's own objects (``gateway.py``), which serve them. Raises ConfigMapTooLarge (gateway.py)."""
    from athanor.kubernetes import gateway as gateway_objects  # it imports this module's names

    gateway = catalog.gateway_spec(doc)
    cluster = gateway.get("kubernetes") or {}
    out = Rendered()
    for name, obj in sorted(doc["models"].items()):
        if obj["spec"].get("residency") == "disabled":
            continue
        problem = _unplaceable(obj, cluster)
        if problem:
            out.skipped[name] = problem
            continue
        objects = [_deployment(doc, name, obj, cluster, out.notes), _service(name, obj, cluster)]
        out.by_model[name] = objects
        out.objects += objects
    out.gateway = gateway_objects.objects(doc, out.by_model, out.notes)
    out.objects = out.gateway + out.objects
    return out


def _unplaceable(obj: dict[str, Any], cluster: dict[str, Any]) -> str | None:
    runtime = obj["spec"]["runtime"]
    if not obj.get("artifact"):
        return "its weights are not on this machine, so their files and size are unknown (pull or scan them first)"
    if runtime not in DEFAULT_IMAGES and not (cluster.get("images") or {}).get(runtime):
        return (f"no container image for {runtime} (set the Gateway's spec.kubernetes.images.{runtime}; MLX runs on "
                "Apple silicon, which clusters seldom have)")
    if "path" in obj["spec"]["source"]:
        root = (cluster.get("models") or {}).get("root")
        if not (cluster.get("models") or {}).get("claim") or not root:
            return ("its weights are a local path: name the volume that holds them (spec.kubernetes.models.claim) "
                    "and the directory it holds (models.root)")
        if _under(obj["artifact"]["path"], root) is None:
            return f"its weights ({obj['artifact']['path']}) are not under spec.kubernetes.models.root ({root})"
    return None


def _under(path: str, root: str) -> str | None:
    """``path`` relative to ``root``, or None when it is not below it."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(os.path.expanduser(root)))
    return None if relative.startswith("..") else relative


INSTANCE_LABEL = "app.kubernetes.io/instance"  # which model's Deployment (and so which model) a pod is of
MODEL_ANNOTATION = "athanor.dev/model"  # the model's own name, as written
MODEL_PODS = {"app.kubernetes.io/component": "model", "app.kubernetes.io/part-of": "athanor"}  # every model's pods


def labels(name: str, obj: dict[str, Any]) -> dict[str, str]:
    return {"app.kubernetes.io/name": label_value(obj["spec"]["runtime"]),
            INSTANCE_LABEL: object_name(PREFIX, name),
            **MODEL_PODS,
            "app.kubernetes.io/managed-by": "athanor"}


def _selector(name: str) -> dict[str, str]:
    return {INSTANCE_LABEL: object_name(PREFIX, name), "app.kubernetes.io/component": "model"}


def _metadata(name: str, obj: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    return {"name": object_name(PREFIX, name), "namespace": cluster.get("namespace", DEFAULT_NAMESPACE),
            "labels": labels(name, obj), "annotations": {MODEL_ANNOTATION: name}}


def _placement(obj: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """nodeSelector, tolerations and the GPU: the model's own, else the Gateway's."""
    own = obj["spec"].get("kubernetes") or {}
    return {key: own[key] if key in own else cluster.get(key) for key in ("nodeSelector", "tolerations", "gpu")}


def _deployment(doc: dict[str, Any], name: str, obj: dict[str, Any], cluster: dict[str, Any],
                notes: list[str]) -> dict[str, Any]:
    runtime = obj["spec"]["runtime"]
    artifact = obj["artifact"]
    weights, projector, volume_source, download = _weights(name, obj, cluster)
    if obj["spec"].get("draft"):
        notes.append(f"{name}: its draft model (spec.draft) is left out on Kubernetes; it serves without one")
    gateway = catalog.gateway_spec(doc)
    launch = launch_spec(
        Target(name, runtime, weights, projector, tuple(artifact.get("capabilities", ())), None),
        effective_for(doc, obj), PORT, RUNTIMES[runtime].binary, quiet=gateway["privacy"]["runtimeLogs"] == "errors",
        extra_args=[(arg, "spec.args") for arg, _ in effective_args(runtime, gateway, obj["spec"])],
        extra_env=effective_env(runtime, gateway, obj["spec"]), secret_file=KEY_FILE)
    args = ["0.0.0.0" if arg == LOOPBACK and before == "--host" else arg
            for before, arg in zip(["", *launch.argv], launch.argv)]
    command, args = _entrypoint(args)
    estimate = fit.estimate_model(doc, obj)
    placement = _placement(obj, cluster)
    resources: dict[str, Any] = {}
    if estimate.total:
        request = math.ceil(estimate.total / 2**20)
        resources = {"requests": {"memory": f"{request}Mi"},
                     "limits": {"memory": f"{math.ceil(request * LIMIT_FACTOR)}Mi"}}
    else:
        notes.append(f"{name}: no memory estimate (its metadata is missing); no memory request is set")
    gpu = placement["gpu"]
    if gpu:
        resources.setdefault("limits", {})[gpu["resource"]] = gpu.get("count", 1)
    # The kubelet's probes carry no key: behind the MLX guard every path wants one, so a listening port is all they
    # can see there (the gateway probes readiness itself, with the key).
    check = {"httpGet": {"path": launch.health_path, "port": "http"}} if command is None else {
        "tcpSocket": {"port": "http"}}
    probe = {**check, "periodSeconds": PROBE_PERIOD_S}
    size_gib = (artifact.get("sizeBytes") or 0) / GIB
    startup_s = STARTUP_BASE_S + math.ceil(size_gib * STARTUP_PER_GIB_S)
    container: dict[str, Any] = {
        "name": "runtime",
        "image": (cluster.get("images") or {}).get(runtime, DEFAULT_IMAGES.get(runtime)),
        **({"command": command} if command else {}),
        "args": args,
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [{"name": key, "value": value} for key, value in sorted(launch.env.items())],
        "resources": resources,
        "startupProbe": {**probe, "failureThreshold": math.ceil(startup_s / PROBE_PERIOD_S)},
        "readinessProbe": {**probe, "failureThreshold": 1},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 3},
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
                         {"name": "runtime-key", "mountPath": KEY_MOUNT, "readOnly": True}],
    }
    if not container["env"]:
        del container["env"]
    pod: dict[str, Any] = {"automountServiceAccountToken": False, "enableServiceLinks": False,
                           "terminationGracePeriodSeconds": math.ceil(STOP_TIMEOUT_S)}  # a stop's bounded grace
    if download:
        pod["initContainers"] = [download]
    pod["containers"] = [container]
    pod["volumes"] = [{"name": "models", **volume_source},
                      {"name": "runtime-key", "secret": {"secretName": cluster.get("runtimeKeySecret",
                                                                                    DEFAULT_KEY_SECRET),
                                                         "defaultMode": 0o400}}]
    if placement["nodeSelector"]:
        pod["nodeSelector"] = dict(sorted(placement["nodeSelector"].items()))
    if placement["tolerations"]:
        pod["tolerations"] = placement["tolerations"]
    metadata = _metadata(name, obj, cluster)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 0,  # athanor scales it to 1 when a request needs the model (serviceManager: kubernetes)
            "strategy": {"type": "Recreate"},  # never two pods of one model: the old one goes first
            "selector": {"matchLabels": _selector(name)},
            "template": {"metadata": {"labels": metadata["labels"], "annotations": metadata["annotations"]},
                         "spec": pod},
        },
    }


def _entrypoint(argv: list[str]) -> tuple[list[str] | None, list[str]]:
    """(the container's command, its args) for a runtime's argv on this machine, whose paths mean nothing in an
    image. llama-server is the image's entrypoint: its args are the argv's. The MLX servers run behind athanor's
    secret guard (``runtimes/guarded.py``), which the image must have: ``python -m athanor.runtimes.guarded``, the
    server named by its console script on the image's PATH."""
    if GUARD_SCRIPT not in argv:
        return None, argv[1:]
    at = argv.index(GUARD_SCRIPT)
    guard_args = argv[at + 1:]
    server = guard_args.index("--") + 1
    guard_args[server] = PurePosixPath(guard_args[server]).name
    return ["python", "-m", "athanor.runtimes.guarded"], guard_args


def _weights(name: str, obj: dict[str, Any], cluster: dict[str, Any]
             ) -> tuple[str, str | None, dict[str, Any], dict[str, Any] | None]:
    """(weights path in the container, projector path or None, the models volume's source, the init container that
    fetches them or None)."""
    artifact, source = obj["artifact"], obj["spec"]["source"]
    models = cluster.get("models") or {}
    claim = models.get("claim")
    if "path" in source:
        root = models["root"]
        return (str(PurePosixPath(MODELS_MOUNT, _under(artifact["path"], root) or "")),
                str(PurePosixPath(MODELS_MOUNT, _under(artifact["mmproj"], root) or "")) if artifact.get("mmproj")
                else None, {"persistentVolumeClaim": {"claimName": claim, "readOnly": True}}, None)
    repo = source["hf"]["repo"]
    directory = PurePosixPath(MODELS_MOUNT, "hub", object_name("repo", repo))
    weights = _in_repo(artifact["path"])
    projector = _in_repo(artifact["mmproj"]) if artifact.get("mmproj") else None
    if artifact.get("format") == "gguf":
        patterns = [_SHARD.sub("-*-of-*.gguf", weights) if _SHARD.search(weights) else weights]
        patterns += [projector] if projector else []
    else:
        patterns = list(MLX_PATTERNS)
    env = [{"name": "HF_REPO", "value": repo},
           {"name": "HF_REVISION", "value": artifact.get("revision") or ""},
           {"name": "HF_PATTERNS", "value": json.dumps(patterns)},
           {"name": "TARGET_DIR", "value": str(directory)},
           {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    token = cluster.get("hfTokenSecret")
    if token:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token["name"],
                                                                          "key": token.get("key", "token")}}})
    download = {"name": "fetch-weights",
                "image": (cluster.get("images") or {}).get("downloader", DEFAULT_IMAGES["downloader"]),
                "command": ["python", "-c", DOWNLOAD], "env": env,
                "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}]}
    volume = {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}
    return (str(directory / weights), str(directory / projector) if projector else None, volume, download)


def _in_repo(path: str) -> str:
    """A file's path inside its Hub repo, from its path in the HF cache (``.../snapshots/REVISION/PATH``); a model
    directory (MLX) is the repo's root."""
    parts = PurePosixPath(path).parts
    if "snapshots" in parts:
        at = len(parts) - 1 - parts[::-1].index("snapshots")
        inside = parts[at + 2:]
        return str(PurePosixPath(*inside)) if inside else "."
    return PurePosixPath(path).name


def _service(name: str, obj: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, obj, cluster),
        "spec": {"type": "ClusterIP", "selector": _selector(name),
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
