"""serviceManager: kubernetes: each model is a Deployment at zero replicas (``athanor render --target kubernetes``,
applied with kubectl), and the gateway, running in the cluster, scales it to one when a request needs the model.

The verbs, and nothing more (``kubernetes/rbac.py`` renders exactly these into the gateway's Role):
- start: ``PATCH deployments/NAME/scale`` to 1, then wait for the Deployment's new Pod to appear. The pod's own
  readiness is the controller's business, as for a local process: it probes the pod's address, which it learns
  from ``endpoint`` once the pod is placed, every few milliseconds (a readinessProbe's period is seconds).
- stop: the scale back to 0, then wait until the pod is gone (its runtime got SIGTERM, and SIGKILL at the end of
  the pod's grace).
- observe: one list-then-watch of the models' Pods per namespace keeps a cache, so asking "does it still run?"
  every few milliseconds costs no request; a watch that falls too far behind (410 Gone) is listed again.
- logs: the pod's log.

A handle names the Pod by name and uid, with the container's restart count at the start: a container the kubelet
restarted on its own runs another process, which is reported as the end of the one the handle named (as systemd's
and launchd's restarts are). Exit codes are the container's, with 128+N read as killed by signal N.

Everything here is async (``kubernetes_asyncio``, on aiohttp). The client and the watch belong to the event loop
that made them: a command that runs its own loop (``athanor down``) gets its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from athanor.errors import AthanorError
from athanor.kubernetes.gateway import ENV_RUNTIME_KEY_FILE, RUNTIME_KEY_FILE
from athanor.kubernetes.manifests import DEFAULT_NAMESPACE, INSTANCE_LABEL, MODEL_ANNOTATION, MODEL_PODS, PREFIX
from athanor.kubernetes.manifests import PORT as RUNTIME_PORT
from athanor.kubernetes.names import object_name
from athanor.managers.base import Handle, Job, JobState
from athanor.timestamps import utc_timestamp

if TYPE_CHECKING:
    from pathlib import Path

    from athanor.fit import Memory
    from athanor.runtimes.launch import LaunchSpec

log = logging.getLogger("athanor.kubernetes")

MODEL_PODS_SELECTOR = ",".join(f"{key}={value}" for key, value in sorted(MODEL_PODS.items()))
POD_APPEARS_S = 60.0  # after a scale to 1, the ReplicaSet controller creates the pod within this, or something blocks
GONE_AFTER_GRACE_S = 30.0  # past the caller's grace, how long a terminating pod may take to be deleted
WATCH_S = 300  # a watch is renewed this often (the server ends it), from the last resourceVersion seen
SYNC_S = 30.0  # how long a request waits for the first list of the pods before it fails
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # a failed list or watch is tried again after these pauses, then every 5 s
QUIET_S = 5.0  # a wait that hears of no change for this long lists the pods again and watches afresh
_STUCK = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
          "CreateContainerError", "RunContainerError")  # a container waiting for one of these will not start by itself


class KubernetesError(AthanorError):
    """The cluster refused or did not carry out a request; the message says which object and why."""


class KubernetesManager:
    name = "kubernetes"
    local = False

    def __init__(self, settings: dict[str, Any]):
        """``settings``: the Gateway's ``spec.kubernetes`` (namespace, context, memory)."""
        self.namespace: str = settings.get("namespace") or DEFAULT_NAMESPACE
        self.context: str | None = settings.get("context")
        self.budget: int | None = _quantity(settings["memory"]) if settings.get("memory") else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: Any = None
        self._watch: asyncio.Task[None] | None = None
        self._pods: dict[str, dict[str, Any]] = {}  # name -> the Pod as last seen
        self._exits: dict[str, int | None] = {}  # uid of a pod deleted since -> its container's last exit code
        self._synced: asyncio.Event | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._last_error: str | None = None  # why the last list or watch failed, for the error a request gets

    # ------------------------------------------------------------------ the seam

    def files(self, job: Job) -> dict[Path, bytes]:
        return {}  # the manifests are rendered for kubectl (athanor render), not written by the gateway

    def prepared(self, launch: LaunchSpec) -> LaunchSpec:
        """The runtime listens on the pod's port and takes the cluster's runtime key (a Secret mounted in every
        model pod and in the gateway's): a per-start secret could not reach a pod. No parking: the pod's disk is
        not the gateway's."""
        path = os.environ.get(ENV_RUNTIME_KEY_FILE) or RUNTIME_KEY_FILE
        try:
            with open(path, encoding="utf-8") as handle:
                key = handle.read().strip()
        except OSError as exc:
            raise KubernetesError(f"cannot read the runtime key {path} ({exc.strerror or exc}): mount the Secret the "
                                  "model pods use (spec.kubernetes.runtimeKeySecret) there") from exc
        if not key:
            raise KubernetesError(f"the runtime key {path} is empty")
        return replace(launch, port=RUNTIME_PORT, secret=key, secret_file=None, park_dir=None)

    def endpoint(self, handle: Handle, launch: LaunchSpec) -> tuple[str, int] | None:
        pod = self._pod_of(handle)
        address = (pod or {}).get("status", {}).get("podIP")
        return (address, _container_port(pod)) if pod is not None and address else None

    def memory(self) -> Memory | None:
        """``spec.kubernetes.memory`` less the memory the models' pods request now (None: no budget, the
        scheduler alone decides where a model fits)."""
        if self.budget is None:
            return None
        from athanor.fit import Memory

        used = sum(_memory_request(pod) for pod in self._pods.values() if not _deleting(pod))
        return Memory(self.budget, max(self.budget - used, 0))

    async def start(self, job: Job) -> Handle:
        deployment = object_name(PREFIX, job.name)
        await self._connect()
        gone = {name for name, pod in self._pods.items() if _of(pod, deployment)}
        await self._scale(deployment, 1, job.name)
        pod = await self._until(lambda: self._new_pod(deployment, gone), POD_APPEARS_S)
        if pod is None:
            raise KubernetesError(f"{self.namespace}/{deployment} was scaled to 1, but no pod appeared within "
                                  f"{POD_APPEARS_S:.0f} s (a quota or an admission webhook?); see 'kubectl describe "
                                  f"deployment -n {self.namespace} {deployment}'")
        return {"manager": self.name, "namespace": self.namespace, "deployment": deployment,
                "pod": pod["metadata"]["name"], "uid": pod["metadata"]["uid"], "restarts": _restarts(pod),
                "started_at": utc_timestamp()}

    async def stop(self, handle: Handle, grace: float) -> int | None:
        await self._connect()
        try:
            await self._scale(handle["deployment"], 0, handle["deployment"])
        except KubernetesError:
            if self._pod_of(handle) is not None:
                raise
            return self._exits.get(handle["uid"])  # its Deployment was deleted, and its pod is gone with it
        pod = self._pod_of(handle)
        pod_grace = float((pod or {}).get("spec", {}).get("terminationGracePeriodSeconds") or 30)
        gone = await self._until(lambda: self._pod_of(handle) is None, max(grace, pod_grace) + GONE_AFTER_GRACE_S)
        if gone is None:
            raise KubernetesError(f"pod {self.namespace}/{handle['pod']} is still there "
                                  f"{max(grace, pod_grace) + GONE_AFTER_GRACE_S:.0f} s after its Deployment was "
                                  "scaled to 0")
        return self._exits.get(handle["uid"])

    async def observe(self, handle: Handle) -> JobState:
        await self._connect()
        pod = self._pod_of(handle)
        if pod is None:
            return JobState(False, None, self._exits.get(handle.get("uid", "")), 0, f"pod {handle['pod']} is gone")
        status = _container(pod)
        restarts = _restarts(pod) - int(handle.get("restarts", 0))
        return JobState(self._running_now(handle), None, _exit_code(status), restarts, _describe(pod, status))

    async def wait_exit(self, handle: Handle, timeout: float) -> bool:
        await self._connect()
        return await self._until(lambda: not self._running_now(handle), timeout) is not None

    async def housekeeping(self, handles: list[Handle]) -> None:
        pass  # the kubelet keeps the logs and the pods

    def forget(self, handle: Handle) -> None:
        self._exits.pop(handle.get("uid", ""), None)

    async def strays(self, known: list[Handle]) -> list[Handle]:
        """Handles for the models' pods that run and that none of ``known`` names (a gateway's record is lost with
        its pod: what its predecessor scaled up still runs)."""
        await self._connect()
        uids = {handle.get("uid") for handle in known}
        return [{"manager": self.name, "namespace": self.namespace,
                 "deployment": pod["metadata"]["labels"][INSTANCE_LABEL], "pod": name, "uid": pod["metadata"]["uid"],
                 "restarts": _restarts(pod), "model": (pod["metadata"].get("annotations") or {}).get(
                     MODEL_ANNOTATION, "")}
                for name, pod in sorted(self._pods.items())
                if pod["metadata"]["uid"] not in uids and not _deleting(pod)
                and INSTANCE_LABEL in (pod["metadata"].get("labels") or {})]

    async def log_tail(self, handle: Handle, lines: int) -> list[str]:
        """The last ``lines`` of the runtime's log, from its pod (the kubelet keeps it; the gateway has no file)."""
        from kubernetes_asyncio.client import CoreV1Api
        from kubernetes_asyncio.client.exceptions import ApiException

        await self._connect()
        try:
            text = await CoreV1Api(self._api).read_namespaced_pod_log(handle["pod"], self.namespace,
                                                                      container="runtime", tail_lines=lines)
        except ApiException as exc:
            return [f"(no log from pod {self.namespace}/{handle['pod']}: {_said(exc)})"]
        return text.splitlines()[-lines:] if lines > 0 else []

    async def close(self) -> None:
        """Stop watching and close the client (the daemon's shutdown; a command's loop ends with it)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
            self._watch = None
        if self._api is not None:
            await self._api.close()
            self._api = None
        self._loop = None

    # ------------------------------------------------------------------ the pods, as last seen

    def _pod_of(self, handle: Handle) -> dict[str, Any] | None:
        pod = self._pods.get(handle.get("pod", ""))
        return pod if pod is not None and pod["metadata"].get("uid") == handle.get("uid") else None

    def _new_pod(self, deployment: str, old: set[str]) -> dict[str, Any] | None:
        return next((pod for name, pod in sorted(self._pods.items())
                     if name not in old and _of(pod, deployment) and not _deleting(pod)), None)

    def _running_now(self, handle: Handle) -> bool:
        """Whether the container the handle names still runs, or is still on its way to running: a pod being
        deleted, a container the kubelet restarted, one that ended or one stuck (no image, a bad config) is not."""
        pod = self._pod_of(handle)
        if pod is None or _deleting(pod):
            return False
        status = _container(pod)
        return (_restarts(pod) == int(handle.get("restarts", 0)) and "terminated" not in (status.get("state") or {})
                and _waiting(status) not in _STUCK)

    async def _until(self, found: Any, timeout: float) -> Any:
        """``found()`` once it is truthy, re-checked after every change the watch sees; None after ``timeout``.

        A watch can go quiet without ending (a connection some proxy or load balancer dropped without a word, a
        stalled stream): one that brings no change for ``QUIET_S`` while something waits on it is replaced by a
        new list and watch, so a wait ends at most that long after what it waits for happened."""
        deadline = time.monotonic() + timeout
        while True:
            value = found()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, min(remaining, QUIET_S))
            except TimeoutError:
                if remaining > QUIET_S:
                    self._watch_afresh()
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _watch_afresh(self) -> None:
        """End the watch and start another, from a new list of the pods (``_follow``); the cache serves meanwhile."""
        if self._watch is not None and self._loop is asyncio.get_running_loop():
            self._watch.cancel()
            self._watch = self._loop.create_task(self._follow(), name=f"kubernetes-watch-{self.namespace}")

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ the API

    async def _connect(self) -> None:
        """The client and the watch of this event loop, made on first use; returns once the pods are listed."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._api, self._watch, self._loop = None, None, loop  # the last loop's are gone with it
            self._pods.clear()
            self._synced = asyncio.Event()
            self._api = await _client(self.context)
            self._watch = loop.create_task(self._follow(), name=f"kubernetes-watch-{self.namespace}")
        assert self._synced is not None
        if not self._synced.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(self._synced.wait()), SYNC_S)
            except TimeoutError:
                raise KubernetesError(f"cannot list the pods of namespace {self.namespace} "
                                      f"({self._last_error or 'no answer'}); is the API server reachable, and does "
                                      "the gateway's Role allow it?") from None

    async def _scale(self, deployment: str, replicas: int, model: str) -> None:
        from kubernetes_asyncio.client import AppsV1Api
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await AppsV1Api(self._api).patch_namespaced_deployment_scale(
                deployment, self.namespace, {"spec": {"replicas": replicas}})
        except ApiException as exc:
            if exc.status == 404:
                raise KubernetesError(
                    f"model {model!r}: no Deployment {self.namespace}/{deployment}; render the manifests and apply "
                    "them: athanor render --target kubernetes -f SPECS | kubectl apply -f -") from exc
            raise KubernetesError(f"scaling {self.namespace}/{deployment} to {replicas}: {_said(exc)}") from exc

    async def _follow(self) -> None:
        """List the models' pods, then watch them from that resourceVersion; list again when the watch is too old
        (410) or broke. Runs until the manager closes."""
        from kubernetes_asyncio.client import CoreV1Api

        core = CoreV1Api(self._api)
        failures = 0
        while True:
            try:
                version = await self._list(core)
                failures = 0
                while version is not None:
                    version = await self._watch_from(core, version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the API is unreachable or refused: say so, and try again
                pause = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                self._last_error = str(exc)
                log.warning("watching the pods of namespace %s: %s; again in %g s", self.namespace, exc, pause)
                if failures == 1 or failures % 10 == 0:
                    log.warning("(the gateway's Role must allow list and watch on pods: athanor render renders it)")
                await asyncio.sleep(pause)  # a back-off between attempts at an API that failed

    async def _list(self, core: Any) -> str:
        response = await core.list_namespaced_pod(self.namespace, label_selector=MODEL_PODS_SELECTOR,
                                                  _preload_content=False)
        async with response:
            body = await _json(response)
        seen = {pod["metadata"]["name"]: pod for pod in body.get("items", [])}
        for name, pod in self._pods.items():  # deleted while nobody watched
            if name not in seen:
                self._ended(pod)
        self._pods = seen
        assert self._synced is not None
        self._synced.set()
        self._changed()
        return body["metadata"]["resourceVersion"]

    async def _watch_from(self, core: Any, version: str) -> str | None:
        """Follow one watch; returns the resourceVersion to go on from, or None to list again."""
        response = await core.list_namespaced_pod(
            self.namespace, label_selector=MODEL_PODS_SELECTOR, watch=True, resource_version=version,
            allow_watch_bookmarks=True, timeout_seconds=WATCH_S, _preload_content=False)
        async with response:
            if response.status != 200:
                await _json(response)  # raises with the API's words
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, pod = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if pod.get("code") == 410:
                        return None  # too old: list again
                    raise KubernetesError(f"watch: {pod.get('message') or pod}")
                version = pod.get("metadata", {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                name = pod["metadata"]["name"]
                if kind == "DELETED":
                    self._pods.pop(name, None)
                    self._ended(pod)
                else:
                    self._pods[name] = pod
                self._changed()
        return version

    def _ended(self, pod: dict[str, Any]) -> None:
        self._exits[pod["metadata"]["uid"]] = _exit_code(_container(pod))


async def _client(context: str | None) -> Any:
    """An API client with the standard credentials: in a cluster the pod's service account, else the kubeconfig
    (``KUBECONFIG``, or ~/.kube/config) at ``context`` or its current one."""
    try:
        from kubernetes_asyncio import client, config
    except ImportError as exc:
        raise KubernetesError("serviceManager kubernetes needs the Kubernetes client: pip install "
                              "'athanor-gateway[kubernetes]'") from exc

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            await config.load_kube_config(context=context, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise KubernetesError(f"no Kubernetes credentials: {exc} (in a cluster, the gateway's service account; "
                              "elsewhere a kubeconfig, KUBECONFIG or ~/.kube/config)") from exc
    return client.ApiClient(configuration)


async def _json(response: Any) -> dict[str, Any]:
    text = await response.text()
    if response.status != 200:
        try:
            message = json.loads(text).get("message") or text
        except ValueError:
            message = text
        raise KubernetesError(f"HTTP {response.status}: {message.strip()[:300]}")
    return json.loads(text)


def _said(exc: Any) -> str:
    try:
        return f"HTTP {exc.status}: {json.loads(exc.body).get('message') or exc.reason}"
    except (TypeError, ValueError, AttributeError):
        return f"HTTP {exc.status}: {exc.reason}"


def _of(pod: dict[str, Any], deployment: str) -> bool:
    return (pod["metadata"].get("labels") or {}).get(INSTANCE_LABEL) == deployment


def _deleting(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == "runtime"), statuses[0] if statuses else {})


def _restarts(pod: dict[str, Any]) -> int:
    return int(_container(pod).get("restartCount") or 0)


def _waiting(status: dict[str, Any]) -> str:
    return ((status.get("state") or {}).get("waiting") or {}).get("reason", "")


def _exit_code(status: dict[str, Any]) -> int | None:
    """The container's last exit: its code, or minus the signal that killed it (a runtime reports 128+N)."""
    ended = (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")
    if not ended or ended.get("exitCode") is None:
        return None
    code = int(ended["exitCode"])
    if ended.get("signal"):
        return -int(ended["signal"])
    return -(code - 128) if 128 < code < 160 else code


def _container_port(pod: dict[str, Any]) -> int:
    for container in pod.get("spec", {}).get("containers", []):
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                return int(port["containerPort"])
    return RUNTIME_PORT


def _memory_request(pod: dict[str, Any]) -> int:
    total = 0
    for container in pod.get("spec", {}).get("containers", []):
        request = ((container.get("resources") or {}).get("requests") or {}).get("memory")
        if request:
            total += _quantity(str(request))
    return total


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _quantity(text: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``2G``, ``1073741824``) in bytes; 0 when unreadable."""
    for suffix, factor in _SUFFIXES.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, factor = text, 1
    try:
        return int(float(number) * factor)
    except ValueError:
        return 0


def _describe(pod: dict[str, Any], status: dict[str, Any]) -> str:
    phase = (pod.get("status") or {}).get("phase", "?")
    words = [f"pod {pod['metadata']['name']}: {phase}"]
    if _deleting(pod):
        words.append("terminating")
    reason = _waiting(status)
    if reason:
        message = ((status.get("state") or {}).get("waiting") or {}).get("message", "")
        words.append(f"waiting: {reason}" + (f" ({message})" if message else ""))
    if status.get("ready"):
        words.append("ready")
    if status.get("restartCount"):
        words.append(f"{status['restartCount']} restarts")
    return ", ".join(words)
