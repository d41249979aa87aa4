"""Kubernetes, through its official Python client: a run becomes one `batch/v1` Job whose pod runs the
one-shot worker (`python -m app.cli worker --run N`); the dispatcher lists the installation's Jobs and
their pods to say what became of each (waiting and why, running on which node, ended how), and deletes a
Job to cancel it.

The manifest is built from the provider's checked settings (app.providers.config) and the run's number;
the operator's `pod_template` is merged over the pod's spec. Secrets never appear in it: the worker's
token and database address come from a Secret the operator made (`envFrom`), named in the provider.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from app.providers.slurm import JobState, SlurmError

if TYPE_CHECKING:
    from app.providers.config import KubernetesProvider

INSTALL_LABEL = "tuneboard.dev/installation"
RUN_LABEL = "tuneboard.dev/run"
KEEP_FINISHED_SECONDS = 3600  # a finished Job (and its pod's log) stays this long for the page to show
TIMEOUT = 30.0  # seconds the API server has to answer a call (the dispatcher never hangs on one)
PREEMPTED = ("Evicted", "Preempting")  # a pod's reasons when the cluster took its node back


class KubernetesError(SlurmError):
    """A call to the API server failed: `unreachable` when it did not answer, else it refused."""


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: mappings merged key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def manifest(
    provider: KubernetesProvider, run_id: int, name: str, install: str, env: dict[str, str]
) -> dict[str, Any]:
    """The Job for one run: a pod with the worker's container (its image, resources, plain settings and
    the operator's Secret), the provider's placement (node selector, tolerations, service account), the
    operator's pod template over it, no retries (Tuneboard submits a new Job itself)."""
    labels = {INSTALL_LABEL: install, RUN_LABEL: str(run_id)}
    resources: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    if provider.gpus:
        resources["limits"][provider.gpu_resource] = str(provider.gpus)  # a quantity: a string
    for key, value in (("cpu", provider.cpu), ("memory", provider.memory)):
        if value is not None:
            resources["requests"][key] = value
            resources["limits"][key] = value
    settings = {"TUNEBOARD_DATA_DIR": "/tmp/tuneboard"} | env  # the operator's may move the data
    container: dict[str, Any] = {
        "name": "worker",
        "image": provider.image,
        "command": [provider.python or "python", "-m", "app.cli", "worker", "--run", str(run_id)],
        "env": [{"name": key, "value": value} for key, value in sorted(settings.items())],
        "envFrom": [{"secretRef": {"name": provider.secret}}],
        "resources": {key: value for key, value in resources.items() if value},
    }
    container = merged(container, provider.container_template)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": provider.warning_seconds,
        "containers": [container],
    }
    if provider.time_limit_seconds is not None:  # counted from the pod's start on a node, not its wait
        pod["activeDeadlineSeconds"] = provider.time_limit_seconds
    if provider.node_selector:
        pod["nodeSelector"] = dict(provider.node_selector)
    if provider.tolerations:
        pod["tolerations"] = copy.deepcopy(provider.tolerations)
    if provider.service_account:
        pod["serviceAccountName"] = provider.service_account
    pod = merged(pod, provider.pod_template)
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": KEEP_FINISHED_SECONDS,
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": provider.namespace, "labels": labels},
        "spec": spec,
    }


def validate(job: dict[str, Any]) -> None:
    """The manifest against the Kubernetes API's schema (kubernetes-validate), and as the official
    client's models read it (quantities as strings, say); ValueError with the first problem."""
    import kubernetes_validate
    import pydantic
    from kubernetes import client as k8s

    try:
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "the Job"
        raise ValueError(f"{where}: {exc.message}") from None
    try:
        k8s.V1Job.from_dict(job)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{where}: {first['msg']} (the Kubernetes client reads it so)") from None


_clients: dict[tuple[str | None, bool], Any] = {}  # one per kubeconfig context (credential plugins are slow)


def api(provider: KubernetesProvider):
    """A client for the provider's cluster: the pod's own service account inside a cluster, else the
    kubeconfig's context; made once per context."""
    from kubernetes import client, config

    key = (provider.context, provider.in_cluster)
    if key in _clients:
        return _clients[key]
    try:
        if provider.in_cluster:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            made = client.ApiClient(configuration)
        else:
            made = config.new_client_from_config(context=provider.context)
    except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
        raise KubernetesError(f"its configuration cannot be loaded ({exc})", unreachable=True) from None
    _clients[key] = made
    return made


def _failed(exc: Exception) -> KubernetesError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        import json

        try:
            said = json.loads(exc.body or "{}").get("message") or exc.reason
        except ValueError:
            said = exc.reason
        busy = exc.status is None or exc.status >= 500 or exc.status == 429  # asked again at the next beat
        return KubernetesError(f"{said} (HTTP {exc.status})", unreachable=busy)
    return KubernetesError(f"the API server did not answer ({type(exc).__name__}: {exc})", unreachable=True)


def submit(client, job: dict[str, Any]) -> str:
    """Create the Job; its name is its id here. A 409 means a call that timed out created it already."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    body = k8s.V1Job.from_dict(job)
    assert body is not None
    try:
        k8s.BatchV1Api(client).create_namespaced_job(
            job["metadata"]["namespace"], body, _request_timeout=TIMEOUT
        )
    except ApiException as exc:
        if exc.status != 409:
            raise _failed(exc) from None
    except Exception as exc:  # noqa: BLE001
        raise _failed(exc) from None
    return str(job["metadata"]["name"])


def poll(client, namespace: str, install: str, names: list[str]) -> dict[str, JobState]:
    """What became of these Jobs: one list of the installation's Jobs and one of their pods."""
    from kubernetes import client as k8s

    selector = f"{INSTALL_LABEL}={install}"
    try:
        jobs = (
            k8s.BatchV1Api(client)
            .list_namespaced_job(namespace, label_selector=selector, _request_timeout=TIMEOUT)
            .items
        )
        pods = (
            k8s.CoreV1Api(client)
            .list_namespaced_pod(namespace, label_selector=selector, _request_timeout=TIMEOUT)
            .items
        )
    except Exception as exc:  # noqa: BLE001
        raise _failed(exc) from None
    by_job: dict[str, Any] = {}
    for pod in pods:
        owner = ((pod.metadata.labels if pod.metadata else None) or {}).get("job-name")
        if owner:
            by_job[owner] = pod
    found = {}
    for job in jobs:
        name = job.metadata.name if job.metadata else None
        if name:
            found[name] = _state(job, by_job.get(name))
    return {name: found.get(name, JobState("GONE", None, None)) for name in names}


def _state(job, pod) -> JobState:
    """A Job and its pod in the words the run page uses for any scheduler's job. A Job the cluster gave up
    on (its time limit, an eviction) is not ended while its pod still stops: its worker is handing the
    run back, and a new Job must not race it."""
    status = job.status
    node = pod.spec.node_name if pod is not None and pod.spec is not None else None
    stopping = bool(status.active or getattr(status, "terminating", None))
    pod_reason = pod.status.reason if pod is not None and pod.status is not None else None
    disrupted = (
        pod is not None
        and pod.status is not None
        and any(c.type == "DisruptionTarget" and c.status == "True" for c in pod.status.conditions or [])
    )
    for condition in status.conditions or []:
        if condition.status != "True":
            continue
        if condition.type in ("Complete", "SuccessCriteriaMet"):
            return JobState("COMPLETED", None, node)
        if condition.type in ("Failed", "FailureTarget"):
            if stopping:
                return JobState("STOPPING", condition.reason, node)
            if condition.reason == "DeadlineExceeded" or pod_reason == "DeadlineExceeded":
                return JobState("TIMEOUT", "DeadlineExceeded", node)
            if disrupted or pod_reason in PREEMPTED:
                return JobState("PREEMPTED", pod_reason or "DisruptionTarget", node)
            return JobState("FAILED", condition.reason, node)
        if condition.type == "Suspended":
            return JobState("SUSPENDED", condition.reason, node)
    if pod is None or pod.status is None or pod.status.phase == "Pending":
        reason = None
        if pod is not None and pod.status is not None:
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    reason = condition.reason  # Unschedulable: no node has what it asks for
            for container in pod.status.container_statuses or []:
                waiting = container.state.waiting if container.state else None
                if waiting is not None and waiting.reason:
                    reason = waiting.reason  # ImagePullBackOff…: the kubelet keeps trying; the page says so
        return JobState("PENDING", reason, node)
    if pod.status.phase == "Running":
        return JobState("RUNNING", None, node)
    if pod.status.phase == "Succeeded":
        return JobState("COMPLETED", None, node)
    # a pod that ended before its Job says so: the Job's own condition decides at the next look
    return JobState("STOPPING", pod_reason, node)


def find(client, namespace: str, name: str) -> str | None:
    """The Job of this name, if it exists still unfinished (one created by a call that timed out)."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        job = k8s.BatchV1Api(client).read_namespaced_job(name, namespace, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _failed(exc) from None
    except Exception as exc:  # noqa: BLE001
        raise _failed(exc) from None
    done = job.status is not None and (job.status.succeeded or job.status.failed)
    return None if done else name


def cancel(client, namespace: str, name: str) -> None:
    """Delete the Job and its pod (the worker gets its grace period to hand the run back)."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        k8s.BatchV1Api(client).delete_namespaced_job(
            name, namespace, propagation_policy="Background", _request_timeout=TIMEOUT
        )
    except ApiException as exc:
        if exc.status != 404:  # gone already
            raise _failed(exc) from None
    except Exception as exc:  # noqa: BLE001
        raise _failed(exc) from None
