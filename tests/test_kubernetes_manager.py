"""serviceManager: kubernetes against the stand-in API server (fixtures/kube_api.py): the real kubernetes_asyncio
client over HTTP, the real llama-server as each pod's container, the gateway as a real ``athanor serve``.

The serving suite's core (tests/test_serving.py, CORE_MANAGERS) runs under this manager too; these are what only a
cluster has: the Role against the calls really made, pod logs, re-attaching to pods, a Deployment never applied, an
image that cannot be pulled, and the cluster's memory budget.
"""

from __future__ import annotations

import os
import signal
import sys
import urllib.error
import urllib.request

import openai
from pathlib import Path

import pytest
import yaml
from fixtures.serving import KUBE_NAMESPACE, apply_gateway, chat, start_daemon, wait_until

from athanor.kubernetes import rbac

pytestmark = pytest.mark.parametrize("gateway", ["kubernetes"], indirect=True)


def _deployment_pods(gateway, name: str) -> list[dict]:
    return [pod for pod in gateway.kube.pods(KUBE_NAMESPACE)
            if pod["metadata"]["labels"].get("app.kubernetes.io/instance") == f"athanor-{name}"]


def test_the_role_allows_every_call_the_gateway_makes_and_nothing_it_does_not(gateway):
    """Start, serve, swap, log and stop: each request the gateway sent is one the rendered Role allows, and each
    rule of the Role was needed."""
    chat(gateway.client, "tiny-gguf")
    chat(gateway.client, gateway.other_model)
    assert "listening" in gateway.athanor("logs", gateway.other_model).stdout
    assert gateway.athanor("down").returncode == 0
    gateway.proc.wait(30)
    calls = [call for call in gateway.kube.calls if call.namespace == KUBE_NAMESPACE]
    refused = [call for call in calls if not rbac.allows(call.group, call.resource, call.verb)]
    assert calls and not refused, refused
    used = {(call.group, call.resource, call.verb) for call in calls}
    unused = [(group, resource, verb) for group, resource, verbs in rbac.RULES for verb in verbs
              if (group, resource, verb) not in used]
    assert not unused, f"the Role allows what the gateway never asked for: {unused}"


def test_a_new_gateway_re_attaches_to_the_running_pod_without_restarting_it(gateway):
    """The gateway's pod may be replaced; the model pods it scaled up are adopted from its record, not restarted."""
    chat(gateway.client, "tiny-gguf")
    [pod] = _deployment_pods(gateway, "tiny-gguf")
    pid = gateway.runtime_pid("tiny-gguf")
    gateway.recorded()
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.proc = start_daemon(gateway.home, port)
    wait_until(lambda: gateway.phase("tiny-gguf") == "Ready", 30, "the new gateway to adopt the pod")
    assert chat(gateway.client, "tiny-gguf").model == "tiny-gguf"
    [still] = _deployment_pods(gateway, "tiny-gguf")
    assert still["metadata"]["uid"] == pod["metadata"]["uid"] and gateway.runtime_pid("tiny-gguf") == pid
    assert gateway.live("tiny-gguf")["pod"] == pod["metadata"]["name"]


def test_a_watch_that_goes_quiet_without_ending_does_not_hold_a_stop(gateway, tmp_path):
    """A watch whose connection a proxy dropped without a word sends nothing more and never ends. The gateway
    waiting for a scaled-down pod to go lists the pods again and watches afresh after a few quiet seconds
    (``QUIET_S``), instead of waiting out the pod's grace and more (40 s here) for an event that never comes."""
    chat(gateway.client, "tiny-gguf")
    assert _deployment_pods(gateway, "tiny-gguf")
    gateway.kube.silence_watches()
    apply_gateway(gateway, tmp_path, "  idleTimeout: 1s\n")  # the idle model is stopped: its pod scaled to 0
    wait_until(lambda: not _deployment_pods(gateway, "tiny-gguf"), 30, "the pod deleted by the stand-in")
    wait_until(lambda: gateway.phase("tiny-gguf") == "Standby", 20, "the gateway to see the pod gone")


def test_a_model_whose_deployment_was_never_applied_is_a_503_that_says_what_to_do(gateway, tmp_path):
    from fixtures.serving import apply_models, model_spec
    from fixtures.tiny_models import write_tiny_llama_gguf

    weights = write_tiny_llama_gguf(tmp_path / "weights" / "late.gguf", seed=5)
    apply_models(tmp_path / "late.yaml", model_spec("late", weights, extra="  preset: {ctxSize: 256}\n"))
    with pytest.raises(openai.APIStatusError) as err:
        chat(gateway.client, "late")
    assert err.value.status_code == 503
    assert "no Deployment athanor/athanor-late" in err.value.message and "athanor render" in err.value.message


def test_a_pod_that_cannot_pull_its_image_fails_the_start_with_the_reason(gateway):
    """A container that waits for an image it cannot pull never starts by itself: the start fails at once with the
    kubelet's reason, and the Deployment goes back to zero."""
    deployment = gateway.kube.get("deployments", KUBE_NAMESPACE, "athanor-tiny-gguf")
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.invalid/llama:none"
    for key in ("resourceVersion", "uid", "generation", "creationTimestamp"):
        deployment["metadata"].pop(key, None)
    deployment.pop("status", None)
    gateway.kube.apply([deployment])
    with pytest.raises(openai.APIStatusError) as err:
        chat(gateway.client, "tiny-gguf")
    assert err.value.status_code == 503 and "ErrImagePull" in err.value.message, err.value.message
    wait_until(lambda: not _deployment_pods(gateway, "tiny-gguf"), 30, "the stuck pod to be scaled away")


def test_the_cluster_memory_budget_refuses_a_model_that_does_not_fit(gateway, tmp_path):
    """``spec.kubernetes.memory`` is the machine the memory guard plans with: nothing is scaled up for a model
    whose request would not fit in it."""
    apply_gateway(gateway, tmp_path, "    memory: 1Mi\n")
    with pytest.raises(openai.APIStatusError) as err:
        chat(gateway.client, "tiny-gguf")
    assert err.value.status_code == 503 and "not enough memory" in err.value.message, err.value.message
    assert not _deployment_pods(gateway, "tiny-gguf")
    assert not [call for call in gateway.kube.calls if call.resource == "deployments/scale"]


def test_logs_and_describe_show_the_pod(gateway):
    chat(gateway.client, "tiny-gguf")
    [pod] = _deployment_pods(gateway, "tiny-gguf")
    logs = gateway.athanor("logs", "tiny-gguf", "-n", "200")
    assert logs.returncode == 0 and "listening on http://" in logs.stdout, logs.stderr
    described = gateway.athanor("describe", "model", "tiny-gguf")
    assert described.returncode == 0 and pod["metadata"]["name"] in described.stdout, described.stdout


def test_an_mlx_model_runs_in_its_pod_behind_the_guard_with_nothing_of_this_machine_in_its_manifest(
        gateway, tmp_path, models, monkeypatch):
    """An MLX Deployment names no path of the machine that rendered it: the image's python runs athanor's guard in
    front of the server on the image's PATH. The stand-in's "image" is this virtualenv, first on its PATH."""
    apply_gateway(gateway, tmp_path, "    images: {mlx-lm: athanor.test/mlx}\n")
    gateway.kube.images["athanor.test/mlx"] = []  # its pod runs the manifest's own command
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    rendered = gateway.athanor("render", "--target", "kubernetes", "-f", str(models))
    assert rendered.returncode == 0, rendered.stderr
    [mlx] = [o for o in yaml.safe_load_all(rendered.stdout)
             if o["kind"] == "Deployment" and o["metadata"]["name"] == "athanor-tiny-mlx"]
    container = mlx["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "athanor.runtimes.guarded"]
    local = [arg for arg in container["args"] if arg.startswith("/") and not arg.startswith(("/models/", "/etc/"))]
    assert not local, local
    gateway.kube.apply([mlx])
    assert container["args"][:4] == ["--secret-file", "/etc/athanor/runtime-key/key", "--", "mlx_lm.server"]
    assert container["startupProbe"]["tcpSocket"] == {"port": "http"}  # a kubelet's probe has no key to show
    assert chat(gateway.client, "tiny-mlx").model == "tiny-mlx"
    [pod] = _deployment_pods(gateway, "tiny-mlx")
    with pytest.raises(urllib.error.HTTPError) as refused:  # the guard: nothing without the runtime key
        urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/v1/models", timeout=10)
    assert refused.value.code == 401


def test_a_gateway_that_lost_its_record_stops_the_model_pods_it_finds_running(gateway):
    """A replaced gateway pod starts with an empty state directory: the model pods its predecessor scaled up are
    not adopted blind, they are stopped (they may each hold a GPU)."""
    chat(gateway.client, "tiny-gguf")
    [pod] = _deployment_pods(gateway, "tiny-gguf")
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    (gateway.home / "state.json").unlink()
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.proc = start_daemon(gateway.home, port)
    wait_until(lambda: not _deployment_pods(gateway, "tiny-gguf"), 30, "the stray pod to be scaled away")
    events = gateway.athanor("get", "events").stdout
    assert "Orphan" in events and pod["metadata"]["name"] in events, events
    assert chat(gateway.client, "tiny-gguf").model == "tiny-gguf"
