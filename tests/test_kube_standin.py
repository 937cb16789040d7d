"""The stand-in Kubernetes API server (fixtures/kube_api.py) through the real kubernetes_asyncio client over HTTP:
a rendered model's Deployment scaled to 1 runs the real llama-server as its pod and answers a completion at the pod's
address, scaled to 0 it ends; a killed container restarts and says how it ended; resourceVersions, watches and
their expiry; the API's error codes; and no process outlives ``close()``."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil
import pytest
import yaml
from conftest import RunCLI, write
from fixtures.kube_api import KubeAPI
from fixtures.tiny_models import write_tiny_llama_gguf
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException


NAMESPACE = "llm"
DEPLOYMENT = "athanor-tiny"
RUNTIME_KEY = "standin-runtime-key"
MODEL_PODS = "app.kubernetes.io/component=model"
T = TypeVar("T")
SPECS = """apiVersion: athanor.dev/v1alpha1
kind: Gateway
metadata: {name: default}
spec:
  kubernetes:
    namespace: llm
    models: {claim: model-weights, root: %(root)s}
---
apiVersion: athanor.dev/v1alpha1
kind: Model
metadata: {name: tiny}
spec:
  runtime: llama-server
  source: {path: %(weights)s}
  preset: {ctxSize: 512}
"""


@pytest.fixture
def rendered(cli: RunCLI, tmp_path: Path, kube_api: KubeAPI) -> dict[str, dict[str, Any]]:
    """``athanor render --target kubernetes`` of one tiny GGUF: its Deployment and Service (replicas 0), the
    claim they mount mapped to the weights' directory, and the runtime key's Secret, all applied."""
    weights = write_tiny_llama_gguf(tmp_path / "weights" / "tiny.gguf")
    specs = write(tmp_path / "specs.yaml", SPECS % {"root": json.dumps(str(weights.parent)),
                                                    "weights": json.dumps(str(weights))})
    result = cli("render", "--target", "kubernetes", "-f", str(specs))
    assert result.returncode == 0, result.stderr
    objects = {o["kind"]: o for o in yaml.safe_load_all(result.stdout)
               if o and (o["metadata"].get("annotations") or {}).get("athanor.dev/model") == "tiny"}
    deployment = objects["Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--model", "/models/tiny.gguf"] and args[args.index("--host") + 1] == "0.0.0.0"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "athanor-runtime-key", "namespace": NAMESPACE},
              "stringData": {"key": RUNTIME_KEY}}
    kube_api.volumes["model-weights"] = weights.parent
    kube_api.apply([secret, deployment, objects["Service"]])
    return {"Deployment": deployment, "Service": objects["Service"], "Secret": secret}


def run(kube: KubeAPI, tmp_path: Path, scenario: Callable[[client.ApiClient], Awaitable[T]]) -> T:
    """Run ``scenario`` with a real client configured from the stand-in's kubeconfig, on a loop of its own."""

    async def main() -> T:
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(kube.kubeconfig(tmp_path / "kubeconfig")),
                                      client_configuration=configuration)
        async with client.ApiClient(configuration) as api:
            return await scenario(api)

    return asyncio.run(main())


async def until(probe: Callable[[], Awaitable[T]], what: str, timeout: float = 30.0) -> T:
    """Poll ``probe`` until it returns something truthy (that is returned), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if value := await probe():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)  # polling interval with a deadline


async def ready_pod(core: client.CoreV1Api) -> client.V1Pod:
    async def probe() -> client.V1Pod | None:
        pods = (await core.list_namespaced_pod(NAMESPACE, label_selector=MODEL_PODS)).items
        return next((p for p in pods if p.metadata.deletion_timestamp is None and p.status.container_statuses
                     and p.status.container_statuses[0].ready), None)

    return await until(probe, "a ready model pod")


def body(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_a_rendered_model_scaled_to_one_serves_from_its_pod_and_scaled_to_zero_ends(
        kube_api: KubeAPI, rendered: dict[str, Any], tmp_path: Path) -> None:
    async def scenario(api: client.ApiClient) -> None:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        listed = await core.list_namespaced_pod(NAMESPACE, label_selector=MODEL_PODS)
        assert listed.items == []
        events: list[dict[str, Any]] = []
        deleted = asyncio.Event()

        async def follow() -> None:
            async with watch.Watch() as stream:
                async for event in stream.stream(core.list_namespaced_pod, NAMESPACE, label_selector=MODEL_PODS,
                                                 resource_version=listed.metadata.resource_version,
                                                 timeout_seconds=60):
                    events.append({"type": event["type"], **event["raw_object"]})
                    if event["type"] == "DELETED":
                        deleted.set()
                        return

        follower = asyncio.create_task(follow())
        scale = await apps.patch_namespaced_deployment_scale(DEPLOYMENT, NAMESPACE, {"spec": {"replicas": 1}})
        assert scale.spec.replicas == 1
        assert scale.status.selector == "app.kubernetes.io/component=model,app.kubernetes.io/instance=athanor-tiny"
        pod = await ready_pod(core)
        ip, name = pod.status.pod_ip, pod.metadata.name
        assert ip.startswith("127.0.0.") and ip != "127.0.0.1" and pod.status.host_ip == "127.0.0.1"
        assert name.startswith(f"{DEPLOYMENT}-") and [len(p) for p in name.split("-")[-2:]] == [10, 5]
        assert pod.metadata.owner_references[0].kind == "ReplicaSet"

        async with aiohttp.ClientSession() as http:  # the real llama-server, at the pod's address, with the key
            async with http.post(f"http://{ip}:8080/v1/completions", json={"prompt": "Hello", "max_tokens": 4},
                                 headers={"Authorization": f"Bearer {RUNTIME_KEY}"}) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["choices"][0]["text"] is not None
            async with http.post(f"http://{ip}:8080/v1/completions", json={"prompt": "Hello"}) as response:
                assert response.status == 401  # the key came from the Secret's volume, and llama-server checks it
        process = psutil.Process(kube_api.pid_of(name))
        assert str(rendered_weights(kube_api)) in process.cmdline()  # /models/tiny.gguf on the claim's directory

        log = await core.read_namespaced_pod_log(name, NAMESPACE, container="runtime", tail_lines=200)
        assert f"listening on http://{ip}:8080" in log
        assert len((await core.read_namespaced_pod_log(name, NAMESPACE, tail_lines=1)).splitlines()) == 1
        with pytest.raises(ApiException) as no_previous:
            await core.read_namespaced_pod_log(name, NAMESPACE, previous=True)
        assert no_previous.value.status == 400 and "previous terminated container" in body(no_previous.value)["message"]
        status = (await apps.read_namespaced_deployment(DEPLOYMENT, NAMESPACE)).status
        assert (status.replicas, status.ready_replicas, status.available_replicas) == (1, 1, 1)
        assert status.observed_generation == 2  # created at 1, the scale changed its spec
        by_field = await core.list_namespaced_pod(NAMESPACE, field_selector=f"metadata.name={name}")
        assert [p.metadata.name for p in by_field.items] == [name]
        others = await core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component!=model")
        assert others.items == []

        followed = await core.read_namespaced_pod_log(name, NAMESPACE, follow=True, _preload_content=False)
        await apps.patch_namespaced_deployment_scale(DEPLOYMENT, NAMESPACE, {"spec": {"replicas": 0}})
        await asyncio.wait_for(deleted.wait(), 30)
        await follower
        assert f"listening on http://{ip}:8080" in (await followed.read()).decode()  # the follow ended with it
        followed.release()
        assert not process.is_running()
        assert (await core.list_namespaced_pod(NAMESPACE)).items == []
        scale = await apps.read_namespaced_deployment_scale(DEPLOYMENT, NAMESPACE)
        assert scale.spec.replicas is None and scale.status.replicas == 0  # omitted at zero, as on the wire

        versions = [int(e["metadata"]["resourceVersion"]) for e in events]
        assert versions == sorted(set(versions)) and versions[0] > int(listed.metadata.resource_version)
        assert events[0]["type"] == "ADDED" and events[0]["status"]["phase"] == "Pending"
        assert events[-1]["type"] == "DELETED" and all(e["type"] == "MODIFIED" for e in events[1:-1])
        running = next(i for i, e in enumerate(events) if e["status"].get("phase") == "Running")
        became_ready = next(i for i, e in enumerate(events) if is_ready(e))
        terminating = next(i for i, e in enumerate(events) if "deletionTimestamp" in e["metadata"])
        assert running <= became_ready < terminating < len(events) - 1
        grace = rendered["Deployment"]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert not is_ready(events[terminating])
        assert events[terminating]["metadata"]["deletionGracePeriodSeconds"] == grace
        final = events[-1]["status"]["containerStatuses"][0]["state"]
        assert "terminated" in final and final["terminated"]["finishedAt"]  # DELETED carries the last state

    run(kube_api, tmp_path, scenario)
    # Every request is recorded with its verb and resource (test_kubernetes_manager.py holds the gateway's to its Role)
    assert ("patch", "apps", "deployments/scale", NAMESPACE, DEPLOYMENT) in kube_api.calls
    assert ("watch", "", "pods", NAMESPACE, None) in kube_api.calls
    assert any(c.verb == "watch" and c.resource == "pods" for c in kube_api.calls)


def rendered_weights(kube: KubeAPI) -> Path:
    return Path(kube.volumes["model-weights"]) / "tiny.gguf"


def test_a_killed_container_restarts_and_reports_exit_code_137(kube_api: KubeAPI, rendered: dict[str, Any],
                                                               tmp_path: Path) -> None:
    async def scenario(api: client.ApiClient) -> None:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        await apps.patch_namespaced_deployment_scale(DEPLOYMENT, NAMESPACE, {"spec": {"replicas": 1}})
        pod = await ready_pod(core)
        name, first = pod.metadata.name, kube_api.pid_of(pod.metadata.name)
        assert first is not None
        before = pod.metadata.resource_version
        os.kill(first, signal.SIGKILL)

        async def restarted() -> client.V1Pod | None:
            pod = await core.read_namespaced_pod(name, NAMESPACE)
            status = pod.status.container_statuses[0]
            return pod if status.restart_count == 1 and status.ready else None

        pod = await until(restarted, "the container restarted and ready again")
        status = pod.status.container_statuses[0]
        assert status.last_state.terminated.exit_code == 137 and status.last_state.terminated.reason == "Error"
        assert status.state.running is not None and pod.status.phase == "Running"
        second = kube_api.pid_of(name)
        assert second is not None and second != first and psutil.pid_exists(second)
        assert "listening on" in await core.read_namespaced_pod_log(name, NAMESPACE, previous=True)

        seen = []  # the same changes replayed from before the kill: Error, then the back-off, then running again
        async with watch.Watch() as stream:
            async for event in stream.stream(core.list_namespaced_pod, NAMESPACE, resource_version=before,
                                             field_selector=f"metadata.name={name}", timeout_seconds=1):
                seen.append(event["raw_object"]["status"]["containerStatuses"][0])
        states = [next(iter(s["state"])) for s in seen]
        crash = states.index("terminated")
        assert seen[crash]["state"]["terminated"]["exitCode"] == 137 and not seen[crash]["ready"]
        assert seen[crash + 1]["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert seen[crash + 1]["restartCount"] == 0 and seen[crash + 2]["restartCount"] == 1
        assert states[crash + 2] == "running"

    run(kube_api, tmp_path, scenario)


def test_watches_replay_from_a_resource_version_and_an_expired_one_is_a_410(kube_api: KubeAPI,
                                                                            tmp_path: Path) -> None:
    def config_map(value: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "default",
                                                                      "labels": {"app": "x"}},
                "data": {"value": value}}

    first = int(kube_api.apply([config_map("0")])[0]["metadata"]["resourceVersion"])
    for value in "12345":
        kube_api.apply([config_map(value)])
    assert kube_api.apply([config_map("5")])[0]["metadata"]["resourceVersion"] == str(first + 5)  # no change, no bump

    async def replay(api: client.ApiClient) -> list[tuple[str, str, str]]:
        core = client.CoreV1Api(api)
        got = []
        async with watch.Watch() as stream:
            async for event in stream.stream(core.list_namespaced_config_map, "default",
                                             resource_version=str(first + 2), label_selector="app=x",
                                             timeout_seconds=1):
                got.append((event["type"], event["raw_object"]["metadata"]["resourceVersion"],
                            event["raw_object"]["data"]["value"]))
        async with watch.Watch() as stream:  # from "0": the current state as ADDED
            async for event in stream.stream(core.list_namespaced_config_map, "default", resource_version="0",
                                             timeout_seconds=1):
                got.append((event["type"], event["raw_object"]["metadata"]["resourceVersion"],
                            event["raw_object"]["data"]["value"]))
        return got

    assert run(kube_api, tmp_path, replay) == [("MODIFIED", str(first + 3), "3"), ("MODIFIED", str(first + 4), "4"),
                                               ("MODIFIED", str(first + 5), "5"), ("ADDED", str(first + 5), "5")]

    kube_api.history_limit = 2  # events up to first+3 are gone
    request = urllib.request.Request(f"{kube_api.url}/api/v1/namespaces/default/configmaps?watch=1&resourceVersion="
                                     f"{first + 1}", headers={"Authorization": f"Bearer {kube_api.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        lines = response.read().decode().splitlines()  # one event, then the stream ends
    assert [json.loads(line) for line in lines] == [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {first + 1} ({first + 4})", "reason": "Expired", "code": 410}}]

    async def expired(api: client.ApiClient) -> tuple[ApiException, ApiException]:
        core = client.CoreV1Api(api)
        errors = []
        for extra in ({"timeout_seconds": 5}, {}):  # with a timeout it raises; without, it retries once, then raises
            with pytest.raises(ApiException) as caught:
                async with watch.Watch() as stream:
                    async for _ in stream.stream(core.list_namespaced_config_map, "default",
                                                 resource_version=str(first + 1), **extra):
                        pass
            errors.append(caught.value)
        return errors[0], errors[1]

    async def bookmarks(api: client.ApiClient) -> list[tuple[str, str]]:
        core = client.CoreV1Api(api)
        got = []
        async with watch.Watch() as stream:
            async for event in stream.stream(core.list_namespaced_config_map, "default", allow_watch_bookmarks=True,
                                             resource_version=str(first + 5), timeout_seconds=0.5):
                got.append((event["type"], event["raw_object"]["metadata"]["resourceVersion"]))
        return got

    kube_api.bookmark_interval = 0.1
    marks = run(kube_api, tmp_path, bookmarks)
    assert marks and set(marks) == {("BOOKMARK", str(kube_api.resource_version))}

    calls_before = len(kube_api.calls)
    with_timeout, forever = run(kube_api, tmp_path, expired)
    assert with_timeout.status == forever.status == 410 and with_timeout.reason.startswith("Expired: too old")
    assert [c.verb for c in kube_api.calls[calls_before:]] == ["watch", "watch", "watch"]


def test_errors_are_status_objects_with_the_apis_codes(kube_api: KubeAPI, rendered: dict[str, Any],
                                                       tmp_path: Path) -> None:
    raw = urllib.request.Request(f"{kube_api.url}/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{DEPLOYMENT}")
    with pytest.raises(urllib.error.HTTPError) as unauthorized:
        urllib.request.urlopen(raw, timeout=10)
    assert unauthorized.value.code == 401
    assert json.loads(unauthorized.value.read())["reason"] == "Unauthorized"
    assert kube_api.calls[-1] == ("get", "apps", "deployments", NAMESPACE, DEPLOYMENT)  # recorded all the same
    calls_before = len(kube_api.calls)

    async def scenario(api: client.ApiClient) -> None:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        with pytest.raises(ApiException) as missing:
            await apps.read_namespaced_deployment("no-such-model", NAMESPACE)
        assert missing.value.status == 404 and body(missing.value) == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": 'deployments.apps "no-such-model" not found', "reason": "NotFound",
            "details": {"name": "no-such-model", "group": "apps", "kind": "deployments"}, "code": 404}
        with pytest.raises(ApiException) as method:
            await core.delete_namespaced_config_map("anything", NAMESPACE)
        assert method.value.status == 405 and body(method.value)["reason"] == "MethodNotAllowed"
        with pytest.raises(ApiException) as unknown:
            await core.read_namespace(NAMESPACE)
        assert unknown.value.status == 404 and body(unknown.value)["kind"] == "Status"
        for selector in ({"label_selector": "a=b=c"}, {"field_selector": "spec.containers=x"}):
            with pytest.raises(ApiException) as bad_selector:
                await core.list_namespaced_pod(NAMESPACE, **selector)
            assert bad_selector.value.status == 400 and body(bad_selector.value)["reason"] == "BadRequest"
        secrets_ = await core.list_namespaced_secret(NAMESPACE, field_selector="metadata.name=athanor-runtime-key")
        assert base64.b64decode(secrets_.items[0].data["key"]).decode() == RUNTIME_KEY  # stringData folded in
        for selector, found in (("app.kubernetes.io/instance in (athanor-tiny,other),!missing", True),
                                ("app.kubernetes.io/instance notin (athanor-tiny)", False),
                                ("app.kubernetes.io/component", True), ("!app.kubernetes.io/component", False)):
            listed = await apps.list_namespaced_deployment(NAMESPACE, label_selector=selector)
            assert [d.metadata.name for d in listed.items] == ([DEPLOYMENT] if found else []), selector

        with pytest.raises(ApiException) as media:
            await apps.patch_namespaced_deployment_scale(DEPLOYMENT, NAMESPACE, {"spec": {"replicas": 1}},
                                                         _content_type="application/apply-patch+yaml")
        assert media.value.status == 415 and body(media.value)["reason"] == "UnsupportedMediaType"
        for replicas in (-1, "one", 1.5, True, 2):
            with pytest.raises(ApiException) as bad:
                await apps.patch_namespaced_deployment_scale(DEPLOYMENT, NAMESPACE, {"spec": {"replicas": replicas}})
            assert bad.value.status == 422 and body(bad.value)["reason"] == "Invalid", replicas
            assert body(bad.value)["details"]["causes"][0]["field"] == "spec.replicas"
        assert "at most 1 pod" in body(bad.value)["message"]  # 2: the stand-in's own limit, said as such
        with pytest.raises(ApiException) as missing_key:  # at zero the Scale has no spec.replicas to replace
            await apps.patch_namespaced_deployment_scale(
                DEPLOYMENT, NAMESPACE, [{"op": "replace", "path": "/spec/replicas", "value": 1}])
        assert missing_key.value.status == 422
        scale = await apps.patch_namespaced_deployment_scale(  # a list body: application/json-patch+json
            DEPLOYMENT, NAMESPACE, [{"op": "add", "path": "/spec/replicas", "value": 1}])
        assert scale.spec.replicas == 1
        scale = await apps.patch_namespaced_deployment_scale(
            DEPLOYMENT, NAMESPACE, [{"op": "replace", "path": "/spec/replicas", "value": 0}])
        assert scale.spec.replicas is None

        current = await apps.read_namespaced_deployment(DEPLOYMENT, NAMESPACE)
        stale = copy.deepcopy(current)
        current.metadata.labels["edited"] = "yes"
        replaced = await apps.replace_namespaced_deployment(DEPLOYMENT, NAMESPACE, current)
        assert int(replaced.metadata.resource_version) > int(stale.metadata.resource_version)
        assert replaced.metadata.generation == current.metadata.generation  # labels are not the spec
        stale.metadata.labels["edited"] = "no"
        with pytest.raises(ApiException) as conflict:
            await apps.replace_namespaced_deployment(DEPLOYMENT, NAMESPACE, stale)
        assert conflict.value.status == 409 and body(conflict.value)["reason"] == "Conflict"
        with pytest.raises(ApiException) as exists:
            await apps.create_namespaced_deployment(NAMESPACE, rendered["Deployment"])
        assert exists.value.status == 409 and body(exists.value)["reason"] == "AlreadyExists"

    run(kube_api, tmp_path, scenario)
    assert ("get", "apps", "deployments", NAMESPACE, "no-such-model") in kube_api.calls[calls_before:]
    assert ("update", "apps", "deployments", NAMESPACE, DEPLOYMENT) in kube_api.calls[calls_before:]


def test_pods_wait_for_their_claim_and_an_unknown_image_never_runs(kube_api: KubeAPI, rendered: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    deployment = copy.deepcopy(rendered["Deployment"])
    deployment["metadata"]["name"] = "elsewhere"
    deployment["spec"]["replicas"] = 1
    deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] = "elsewhere"
    deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] = "elsewhere"
    deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "not-yet"
    unknown = copy.deepcopy(deployment)
    unknown["metadata"]["name"] = unknown["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"][
        "claimName"] = "unknown"
    unknown["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example/unknown:1"
    for selector in (unknown["spec"]["selector"]["matchLabels"], unknown["spec"]["template"]["metadata"]["labels"]):
        selector["app.kubernetes.io/instance"] = "unknown"
    kube_api.volumes["unknown"] = kube_api.volumes["model-weights"]
    kube_api.apply([deployment, unknown])

    async def scenario(api: client.ApiClient) -> None:
        core = client.CoreV1Api(api)

        async def pod_of(instance: str, check: Callable[[client.V1Pod], bool]) -> client.V1Pod | None:
            pods = (await core.list_namespaced_pod(NAMESPACE,
                                                   label_selector=f"app.kubernetes.io/instance={instance}")).items
            return pods[0] if pods and check(pods[0]) else None

        pending = await until(lambda: pod_of("elsewhere", lambda p: bool(p.status.conditions)), "unschedulable")
        scheduled = pending.status.conditions[0]
        assert pending.status.phase == "Pending" and pending.status.pod_ip is None
        assert (scheduled.type, scheduled.status, scheduled.reason) == ("PodScheduled", "False", "Unschedulable")
        assert 'persistentvolumeclaim "not-yet" not found' in scheduled.message
        pulling = await until(lambda: pod_of("unknown", lambda p: p.status.container_statuses is not None and (
            p.status.container_statuses[0].state.waiting or client.V1ContainerStateWaiting()).reason == "ErrImagePull"),
            "ErrImagePull")
        assert pulling.status.phase == "Pending" and kube_api.pid_of(pulling.metadata.name) is None
        with pytest.raises(ApiException) as waiting:
            await core.read_namespaced_pod_log(pulling.metadata.name, NAMESPACE)
        assert waiting.value.status == 400 and "waiting to start: ErrImagePull" in body(waiting.value)["message"]
        with pytest.raises(ApiException) as gone:
            await core.read_namespaced_pod_log("no-such-pod", NAMESPACE)
        assert gone.value.status == 404

        kube_api.volumes["not-yet"] = kube_api.volumes["model-weights"]  # the claim appears: scheduled, then runs
        await until(lambda: pod_of("elsewhere", lambda p: p.status.phase == "Running" and
                                   p.status.container_statuses[0].ready), "running once its claim exists")

    run(kube_api, tmp_path, scenario)


STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(1)\n"


def test_close_leaves_no_process_behind(kube_api: KubeAPI, rendered: dict[str, Any]) -> None:
    kube_api.images["stubborn:1"] = [sys.executable, "-c", STUBBORN]  # ignores SIGTERM: only SIGKILL ends it
    stubborn = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "stubborn", "namespace": "default"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "stubborn"}},
                         "template": {"metadata": {"labels": {"app": "stubborn"}},
                                      "spec": {"containers": [{"name": "main", "image": "stubborn:1"}]}}}}
    model = copy.deepcopy(rendered["Deployment"])
    model["spec"]["replicas"] = 1
    kube_api.apply([model, stubborn])
    deadline = time.monotonic() + 30
    while not all(is_ready(p) for p in kube_api.pods(NAMESPACE) + kube_api.pods("default")) or \
            len(kube_api.pods(NAMESPACE) + kube_api.pods("default")) < 2:
        assert time.monotonic() < deadline, "two running pods"
        time.sleep(0.02)  # polling interval with a deadline
    pids = [kube_api.pid_of(p["metadata"]["name"]) for p in kube_api.pods(NAMESPACE) + kube_api.pods("default")]
    assert all(pids)
    kube_api.close()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert not [c for c in psutil.Process().children(recursive=True) if c.pid in pids]
    with pytest.raises(RuntimeError):
        kube_api.pods("default")


def test_a_pod_sees_its_volumes_environment_and_init_containers_work(kube_api: KubeAPI) -> None:
    """Volumes and env as a pod sees them: a Secret's keys as 0400 files, ``items`` renaming one, values by
    reference to a ConfigMap and a Secret, ``$(VAR)`` expansion in args; an init container whose ``command``
    (found on PATH) replaces the image's entrypoint writes to an emptyDir the container then reads (paths reach a
    process through words and variables that start with a mountPath)."""
    kube_api.images["printer:1"] = [sys.executable, "-c", (
        "import os, stat, sys, time\n"
        "d = sys.argv[1]\n"
        "print(sorted(os.listdir(d)), oct(stat.S_IMODE(os.stat(d + '/renamed').st_mode)), open(d + '/renamed').read(),"
        " os.environ['FROM_CM'], os.environ['TOKEN'], sys.argv[2], open('/scratch/greeting'.replace("
        "'/scratch', os.environ['SCRATCH'])).read().strip(), flush=True)\n"
        "time.sleep(60)\n")]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "default"},
              "data": {"token": base64.b64encode(b"s3cret").decode(), "other": base64.b64encode(b"x").decode()}}
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "default"},
                "data": {"mode": "fast"}}
    printer = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "printer", "namespace": "default"},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "printer"}},
                        "template": {"metadata": {"labels": {"app": "printer"}}, "spec": {
                            "initContainers": [{"name": "greet", "image": "printer:1",
                                                "command": ["sh", "-c", 'echo hello > "$OUT"'],
                                                "env": [{"name": "OUT", "value": "/scratch/greeting"}],
                                                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                            "containers": [{"name": "main", "image": "printer:1", "args": ["/etc/creds", "$(FROM_CM)!"],
                                            "env": [{"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {
                                                "name": "settings", "key": "mode"}}},
                                                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {
                                                        "name": "creds", "key": "other"}}},
                                                    {"name": "SCRATCH", "value": "/scratch"}],
                                            "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds"},
                                                             {"name": "scratch", "mountPath": "/scratch"}]}],
                            "volumes": [{"name": "creds", "secret": {"secretName": "creds",
                                                                     "items": [{"key": "token", "path": "renamed"}]}},
                                        {"name": "scratch", "emptyDir": {}}],
                        }}}}
    kube_api.apply([printer])  # the Secret and ConfigMap come later: the pod waits for them

    def log_line() -> str | None:
        pods = kube_api.pods("default")
        if not pods or kube_api.pid_of(pods[0]["metadata"]["name"]) is None:
            return None
        request = urllib.request.Request(f"{kube_api.url}/api/v1/namespaces/default/pods/"
                                         f"{pods[0]['metadata']['name']}/log",
                                         headers={"Authorization": f"Bearer {kube_api.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode().strip() or None

    deadline = time.monotonic() + 30
    while not kube_api.pods("default"):
        assert time.monotonic() < deadline
        time.sleep(0.02)  # polling interval with a deadline
    waiting = kube_api.pods("default")[0]
    assert waiting["status"]["phase"] == "Pending"
    kube_api.apply([secret, settings])
    while not (line := log_line()):
        assert time.monotonic() < deadline, "the printer's output"
        time.sleep(0.02)  # polling interval with a deadline
    assert line == "['renamed'] 0o400 s3cret fast x fast! hello"
    init = kube_api.pods("default")[0]["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["reason"] == "Completed" and init["state"]["terminated"]["exitCode"] == 0


SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"


def test_recreate_waits_for_the_old_pod_and_a_deleted_deployment_takes_its_pods(kube_api: KubeAPI,
                                                                                 tmp_path: Path) -> None:
    kube_api.images["sleeper:1"] = [sys.executable, "-c", SLEEPER]
    sleeper = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sleeper", "namespace": "default"},
               "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": {"app": "s"}},
                        "template": {"metadata": {"labels": {"app": "s"}}, "spec": {
                            "terminationGracePeriodSeconds": 5,
                            "containers": [{"name": "main", "image": "sleeper:1"}]}}}}
    kube_api.apply([sleeper])

    async def scenario(api: client.ApiClient) -> None:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

        async def running() -> client.V1Pod | None:
            pods = (await core.list_namespaced_pod("default")).items
            return next((p for p in pods if p.status.container_statuses and p.status.container_statuses[0].ready
                         and not p.metadata.deletion_timestamp), None)

        old = await until(running, "the first pod")
        start = (await core.list_namespaced_pod("default")).metadata.resource_version
        await apps.patch_namespaced_deployment_scale("sleeper", "default", {"spec": {"replicas": 0}})
        await apps.patch_namespaced_deployment_scale("sleeper", "default", {"spec": {"replicas": 1}})
        new = await until(running, "a new pod")
        assert new.metadata.name != old.metadata.name
        order, last = [], {}
        async with watch.Watch() as stream:
            async for event in stream.stream(core.list_namespaced_pod, "default", resource_version=start,
                                             timeout_seconds=0.5):
                order.append((event["type"], event["raw_object"]["metadata"]["name"]))
                last[event["raw_object"]["metadata"]["name"]] = event["raw_object"]
        assert order.index(("DELETED", old.metadata.name)) < order.index(("ADDED", new.metadata.name))
        ended = last[old.metadata.name]["status"]["containerStatuses"][0]["state"]["terminated"]
        assert ended["exitCode"] == 128 + signal.SIGTERM  # SIGTERM ended it within its grace
        pid = kube_api.pid_of(new.metadata.name)

        await apps.delete_namespaced_deployment("sleeper", "default")

        async def gone() -> bool:
            return not (await core.list_namespaced_pod("default")).items

        await until(gone, "the pods of a deleted Deployment")
        assert not psutil.pid_exists(pid)
        assert (await apps.list_namespaced_replica_set("default")).items == []

    run(kube_api, tmp_path, scenario)
    assert kube_api.get("deployments", "default", "sleeper") is None
