"""The gateway's own objects on a cluster: athanor itself, running the rendered models with ``serviceManager:
kubernetes``.

The gateway pod cannot see the weights, so it never discovers them: it serves the document ``render`` built on
this machine (models.json's shape, each model's artifact facts from this machine's discovery), held by the
ConfigMap ``athanor-gateway`` and copied into the pod's state volume by an init container before the gateway
starts. That document says what differs in the cluster: the Kubernetes manager, the gateway listening on the
pod's address, discovery off, the Service's names among the Host values served (DNS-rebinding protection), only
the models that have a Deployment, and each model's ``spec.port`` the port its runtime listens on in its pod (the
one its Service forwards to) rather than the free port this machine found for it. It carries no times
(``creationTimestamp``), so the same specs give the same bytes; its digest is an annotation on the pod template,
so applying a changed document restarts the gateway on it.

Around it: one Deployment (one replica, ``Recreate``: two gateways would fight over the models' scale), its
ClusterIP Service, and a ServiceAccount whose Role allows exactly the calls the manager makes (``rbac.py``).
The runtime key Secret is the user's to create (it holds a secret value, so it is never rendered); the gateway
reads the same file the model pods mount, and sends it to them as a Bearer token.

The names and paths below are what the manager (``managers/kubernetes.py``) must agree on: import them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from athanor import API_VERSION, __version__, catalog
from athanor.addresses import parse_listen
from athanor.errors import AthanorError
from athanor.kubernetes import rbac
from athanor.kubernetes.manifests import DEFAULT_KEY_SECRET, DEFAULT_NAMESPACE, KEY_FILE, KEY_MOUNT
from athanor.kubernetes.manifests import PORT as MODEL_PORT
from athanor.managers.jobs import INGRESS_STOP_S

GATEWAY_NAME = "athanor-gateway"  # its Deployment, Service and ConfigMap
SERVICE_ACCOUNT = "athanor"  # the ServiceAccount, Role and RoleBinding
CONTAINER = "gateway"
SERVICE_MANAGER = "kubernetes"
GATEWAY_PORT = 8080
HOME = "/var/lib/athanor"  # ATHANOR_HOME in the gateway pod: an emptyDir, seeded from the ConfigMap
CONFIG_MOUNT = "/etc/athanor/config"
DOCUMENT_KEY = "models.json"  # the ConfigMap's key, and the file in HOME
RUNTIME_KEY_FILE = KEY_FILE  # the runtime key: the file every model pod's runtime checks, and the gateway sends
ENV_HOME = "ATHANOR_HOME"
ENV_SERVICE_MANAGER = "ATHANOR_SERVICE_MANAGER"
ENV_RUNTIME_KEY_FILE = "ATHANOR_RUNTIME_KEY_FILE"
DEFAULT_IMAGE = f"athanor-gateway:{__version__}"  # the user builds it (README): pip install athanor-gateway
DIGEST_ANNOTATION = "athanor.dev/models-sha256"
MAX_CONFIGMAP_BYTES = 1024 * 1024  # the API server refuses a ConfigMap whose keys and values exceed this
MAX_ANNOTATIONS_BYTES = 256 * 1024  # client-side `kubectl apply` copies the object into an annotation this big
MEMORY_REQUEST = "256Mi"
MEMORY_LIMIT = "1Gi"
PRIVILEGED_PORTS = 1024  # binding below this needs a capability the gateway's container drops


class ConfigMapTooLarge(AthanorError):
    """The document the in-cluster gateway serves does not fit in one ConfigMap."""


def labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "athanor",
            "app.kubernetes.io/instance": GATEWAY_NAME,
            "app.kubernetes.io/component": "gateway",
            "app.kubernetes.io/part-of": "athanor",
            "app.kubernetes.io/managed-by": "athanor"}


def _security() -> dict[str, Any]:
    """Neither container needs a privilege: the gateway listens above 1024 and talks HTTP."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _selector() -> dict[str, str]:
    return {"app.kubernetes.io/instance": GATEWAY_NAME, "app.kubernetes.io/component": "gateway"}


def service_hosts(namespace: str) -> list[str]:
    """The names pods reach the gateway's Service by (the cluster's DNS search path and the default domain)."""
    return [GATEWAY_NAME, f"{GATEWAY_NAME}.{namespace}", f"{GATEWAY_NAME}.{namespace}.svc",
            f"{GATEWAY_NAME}.{namespace}.svc.cluster.local"]


def objects(doc: dict[str, Any], models: Iterable[str], notes: list[str]) -> list[dict[str, Any]]:
    """The gateway's objects for ``doc`` (render's document) serving ``models`` (those given a Deployment), in the
    order ``kubectl apply`` best meets them: who it runs as, its document, its Service, then the Deployment.
    Raises ConfigMapTooLarge when the document cannot be held by a ConfigMap."""
    cluster = catalog.gateway_spec(doc).get("kubernetes") or {}
    namespace = cluster.get("namespace", DEFAULT_NAMESPACE)
    served = served_document(doc, models, namespace, notes)
    text = json.dumps(served, indent=2, sort_keys=True) + "\n"
    size = len(DOCUMENT_KEY) + len(text.encode("utf-8"))  # what the API server counts
    if size > MAX_CONFIGMAP_BYTES:
        raise ConfigMapTooLarge(
            f"the gateway's document (ConfigMap {GATEWAY_NAME}, {DOCUMENT_KEY}) would be {size} bytes, over "
            f"Kubernetes' limit of {MAX_CONFIGMAP_BYTES} bytes (1 MiB) for a ConfigMap; render fewer models (every "
            "model of the store is rendered, with those the specs add) or shorten long spec.env and spec.args values")
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(GATEWAY_NAME, namespace),
                  "data": {DOCUMENT_KEY: text}}
    if len(json.dumps(config_map)) > MAX_ANNOTATIONS_BYTES:
        notes.append(f"the gateway's ConfigMap is over {MAX_ANNOTATIONS_BYTES // 1024} KiB, more than client-side "
                     "'kubectl apply' can record in its last-applied annotation: apply with 'kubectl apply "
                     "--server-side'")
    ollama = _ollama_port(served)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return [_service_account(namespace), _role(namespace), _role_binding(namespace), config_map,
            _service(namespace, ollama), _deployment(cluster, namespace, ollama, digest)]


def served_document(doc: dict[str, Any], models: Iterable[str], namespace: str, notes: list[str]
                    ) -> dict[str, Any]:
    """``doc`` as the in-cluster gateway serves it (see the module's docstring); ``doc`` is left as it is."""
    keep = set(models)
    served = copy.deepcopy(doc)
    served["models"] = {name: obj for name, obj in served["models"].items() if name in keep}
    gateway = served.get("gateway") or {"apiVersion": API_VERSION, "kind": "Gateway",
                                         "metadata": {"name": "default", "labels": {}, "annotations": {},
                                                      "generation": 1},
                                         "spec": {}}
    served["gateway"] = gateway
    spec = gateway["spec"]
    spec["serviceManager"] = SERVICE_MANAGER
    spec["listen"] = f"0.0.0.0:{GATEWAY_PORT}"
    spec["discovery"] = {"hfCache": False, "paths": []}  # the weights are on the models' volume, not here
    hosts = list(spec.get("allowedHosts", []))
    if "*" not in hosts:
        spec["allowedHosts"] = hosts + [host for host in service_hosts(namespace) if host not in hosts]
    ollama = (spec.get("ollama") or {}).get("listen")
    if ollama:
        port = parse_listen(ollama)[1]
        problem = (f"it is the gateway's own port ({GATEWAY_PORT})" if port == GATEWAY_PORT else
                   f"a port below {PRIVILEGED_PORTS} needs a capability the gateway's container drops"
                   if port < PRIVILEGED_PORTS else None)
        if problem:
            del spec["ollama"]["listen"]
            notes.append(f"the gateway's Ollama address (spec.ollama.listen: {ollama}) is left out on Kubernetes: "
                         f"{problem}; port {GATEWAY_PORT} answers Ollama's API too")
        else:
            spec["ollama"]["listen"] = f"0.0.0.0:{port}"  # reachable through the Service, on the pod's address
    for obj in served["models"].values():
        obj["spec"]["port"] = MODEL_PORT  # where its runtime listens in its pod, not the port this machine gave it
    for obj in [gateway, *served["models"].values(), *served.get("recipes", {}).values()]:
        obj["metadata"].pop("creationTimestamp", None)  # a render carries no times: the same specs, the same bytes
    return served


def _ollama_port(served: dict[str, Any]) -> int | None:
    listen = (served["gateway"]["spec"].get("ollama") or {}).get("listen")
    return parse_listen(listen)[1] if listen else None


def _metadata(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels()}


def _service_account(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(SERVICE_ACCOUNT, namespace)}


def _role(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _metadata(SERVICE_ACCOUNT, namespace), "rules": rbac.role_rules()}


def _role_binding(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _metadata(SERVICE_ACCOUNT, namespace),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]}


def _service(namespace: str, ollama: int | None) -> dict[str, Any]:
    ports = [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"}]
    if ollama:
        ports.append({"name": "ollama", "port": ollama, "targetPort": "ollama", "protocol": "TCP"})
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(GATEWAY_NAME, namespace),
            "spec": {"type": "ClusterIP", "selector": _selector(), "ports": ports}}


def _deployment(cluster: dict[str, Any], namespace: str, ollama: int | None, digest: str) -> dict[str, Any]:
    image = (cluster.get("images") or {}).get("athanor", DEFAULT_IMAGE)
    config = {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}
    state = {"name": "state", "mountPath": HOME}
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}
    ports = [{"name": "http", "containerPort": GATEWAY_PORT}]
    if ollama:
        ports.append({"name": "ollama", "containerPort": ollama})
    seed = {"name": "seed-store", "image": image,
            "command": ["cp", f"{CONFIG_MOUNT}/{DOCUMENT_KEY}", f"{HOME}/{DOCUMENT_KEY}"],
            "volumeMounts": [config, state], "securityContext": _security()}
    container = {
        "name": CONTAINER,
        "image": image,
        "command": ["athanor", "serve", "--listen", f"0.0.0.0:{GATEWAY_PORT}"],
        "env": [{"name": ENV_HOME, "value": HOME},
                {"name": ENV_RUNTIME_KEY_FILE, "value": RUNTIME_KEY_FILE},
                {"name": ENV_SERVICE_MANAGER, "value": SERVICE_MANAGER}],
        "ports": ports,
        "resources": {"requests": {"memory": MEMORY_REQUEST}, "limits": {"memory": MEMORY_LIMIT}},
        "readinessProbe": {**probe, "failureThreshold": 1},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3,
                          "initialDelaySeconds": 10},
        "volumeMounts": [config, state, {"name": "runtime-key", "mountPath": KEY_MOUNT, "readOnly": True}],
        "securityContext": _security(),
    }
    metadata = _metadata(GATEWAY_NAME, namespace)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # two gateways would fight over the models' scale
            "selector": {"matchLabels": _selector()},
            "template": {
                "metadata": {"labels": metadata["labels"], "annotations": {DIGEST_ANNOTATION: digest}},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": True,  # the manager calls the API server with its token
                    "enableServiceLinks": False,
                    # At its end the gateway stops every model it runs (each a scale to 0 and the pod's own grace).
                    "terminationGracePeriodSeconds": INGRESS_STOP_S,
                    "initContainers": [seed],
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": GATEWAY_NAME}},
                        {"name": "state", "emptyDir": {}},
                        {"name": "runtime-key", "secret": {"secretName": cluster.get("runtimeKeySecret",
                                                                                      DEFAULT_KEY_SECRET),
                                                           "defaultMode": 0o400}},
                    ],
                },
            },
        },
    }
