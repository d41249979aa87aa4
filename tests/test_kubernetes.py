"""Kubernetes as a compute provider, without a cluster (none can run here): the Job manifests Tuneboard
would submit are valid against the Kubernetes API's schema (kubernetes-validate) and read by the official
client's models for every provider option, a provider whose templates would break the Job is refused when
the file is read, and the submit, watch and cancel code drives the official client against API server
answers written in the API's shapes (tests/k8s_recorded.py), through the dispatcher as for Slurm."""

from __future__ import annotations

import json

import pytest
import urllib3
from pydantic import SecretStr

from app.providers import kubernetes as k8s
from app.providers.config import ProviderProblem, load
from tests.k8s_recorded import INSTALL, NAMESPACE, UNSCHEDULABLE, RecordedApiServer, job, listing, pod, status

IMAGE = "registry.lab/tuneboard:0.1.0"
BASE = {
    "name": "cloud",
    "kind": "kubernetes",
    "secret": "tuneboard-worker",
    "namespace": NAMESPACE,
    "image": "registry.lab/tuneboard:0.1.0",
}
JOBS = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def write(settings, *providers: dict) -> None:
    (settings.data_dir / "providers.yaml").write_text(json.dumps({"providers": list(providers)}))


OPTIONS = {
    "minimal": {},
    "gpus": {"gpus": 2, "gpu_resource": "amd.com/gpu", "cpu": "8", "memory": "64Gi"},
    "placement": {
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "service_account": "tuneboard-jobs",
    },
    "settings": {
        "environment": {"HF_HOME": "/cache/hf", "TUNEBOARD_DATA_DIR": "/cache/tuneboard"},
        "time_limit": "04:00:00",
        "server_url": "http://tuneboard.ml.svc:8000",
        "python": "/opt/venv/bin/python",
        "warning_seconds": 300,
    },
    "pod template": {
        "pod_template": {
            "priorityClassName": "batch-low",
            "imagePullSecrets": [{"name": "registry"}],
            "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
        },
        "container_template": {
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            "resources": {"limits": {"ephemeral-storage": "50Gi"}},
        },
    },
}


@pytest.mark.parametrize("option", OPTIONS, ids=list(OPTIONS))
def test_every_providers_job_is_valid_against_the_kubernetes_schema(settings, option):
    write(settings, BASE | OPTIONS[option])
    provider = load(settings)["cloud"]  # reading the file validates a Job of the provider too
    plain = {"TUNEBOARD_GENERATION": "false"} | provider.environment  # as the dispatcher's backend passes it
    manifest = k8s.manifest(provider, 12, "tuneboard-x-run-12-1", INSTALL, plain)
    k8s.validate(manifest)
    pod_spec = manifest["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["command"][-4:] == ["app.cli", "worker", "--run", "12"]
    assert manifest["spec"]["backoffLimit"] == 0 and pod_spec["restartPolicy"] == "Never"
    if option == "gpus":
        assert container["resources"]["limits"] == {"amd.com/gpu": "2", "cpu": "8", "memory": "64Gi"}
    if option == "placement":
        assert pod_spec["serviceAccountName"] == "tuneboard-jobs" and pod_spec["tolerations"][0]["key"]
    assert container["envFrom"] == [{"secretRef": {"name": "tuneboard-worker"}}]
    if option == "settings":
        assert pod_spec["activeDeadlineSeconds"] == 4 * 3600  # counted once the pod is on a node
        assert "activeDeadlineSeconds" not in manifest["spec"]  # not while it waits for one
        assert pod_spec["terminationGracePeriodSeconds"] == 300
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["TUNEBOARD_DATA_DIR"] == "/cache/tuneboard"  # the operator's, not the default
    if option == "pod template":
        assert pod_spec["priorityClassName"] == "batch-low" and len(pod_spec["containers"]) == 1
        assert (container["image"], container["volumeMounts"][0]["mountPath"]) == (IMAGE, "/cache")
        assert container["resources"]["limits"]["ephemeral-storage"] == "50Gi"


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ({"pod_template": {"containers": [{"name": "worker"}]}}, "put the worker container's additions"),
        ({"pod_template": {"overhead": {"cpu": 1}}}, "the Kubernetes client reads it so"),
        ({"secret": None}, "secret"),
        ({"pod_template": {"restartPolicy": 3}}, "restartPolicy"),
        ({"tolerations": [{"operator": "Sometimes", "effect": 5}]}, "tolerations"),
        ({"namespace": "ML Team"}, "namespace"),
        ({"image": "registry/x\n#evil"}, "one line"),
        ({"memory": "lots"}, "memory"),
    ],
)
def test_a_provider_whose_job_would_be_invalid_is_refused_when_read(settings, bad, said):
    write(settings, BASE | bad)
    with pytest.raises(ProviderProblem) as refused:
        load(settings)
    assert said in str(refused.value)


@pytest.fixture
def server() -> RecordedApiServer:
    return RecordedApiServer()


def test_submit_watch_and_cancel_through_the_official_client(settings, server):
    write(settings, BASE | {"gpus": 1})
    provider = load(settings)["cloud"]
    client = server.client()
    name = "tuneboard-x-run-7-1"
    manifest = k8s.manifest(provider, 7, name, INSTALL, {})
    server.answer("POST", JOBS, (201, job(name, 7)))
    assert k8s.submit(client, manifest) == name
    method, path, _, sent = server.requests[-1]
    assert (method, path) == ("POST", JOBS) and sent == manifest  # the manifest, as built

    def states(jobs: list[dict], pods: list[dict], names: list[str]) -> dict:
        server.answer("GET", JOBS, (200, listing("JobList", jobs)))
        server.answer("GET", PODS, (200, listing("PodList", pods)))
        return k8s.poll(client, NAMESPACE, INSTALL, names)

    waiting = states([job(name, 7, active=1)], [pod(name, 7, "Pending", **UNSCHEDULABLE)], [name, "gone-1"])
    assert waiting[name] == k8s.JobState("PENDING", "Unschedulable", None)
    assert waiting["gone-1"].state == "GONE"
    query = server.requests[-1][2]
    assert query["labelSelector"] == [f"tuneboard.dev/installation={INSTALL}"]
    running = states([job(name, 7, active=1)], [pod(name, 7, "Running", node="gke-l4-pool-2b")], [name])
    assert running[name] == k8s.JobState("RUNNING", None, "gke-l4-pool-2b")
    # the time limit: the Job's verdict while its pod stops (its worker hands the run back), then its end
    target = [{"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}]
    stopping = pod(name, 7, "Running", node="gke-l4-pool-2b")
    assert states([job(name, 7, active=1, conditions=target)], [stopping], [name])[name].state == "STOPPING"
    timed_out = [*target, {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
    ended = pod(name, 7, "Failed", reason="DeadlineExceeded", node="gke-l4-pool-2b")
    assert states([job(name, 7, conditions=timed_out)], [ended], [name])[name].state == "TIMEOUT"
    # a drain or the scheduler's preemption: a disruption, not a failure of the run's
    disruption = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    preempted = pod(name, 7, "Failed", conditions=[disruption], node="gke-l4-pool-2b")
    failed = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
    assert states([job(name, 7, conditions=failed)], [preempted], [name])[name].state == "PREEMPTED"
    crashed = pod(name, 7, "Failed", node="gke-l4-pool-2b")
    assert states([job(name, 7, conditions=failed)], [crashed], [name])[name] == k8s.JobState(
        "FAILED", "BackoffLimitExceeded", "gke-l4-pool-2b"
    )
    done = [{"type": "Complete", "status": "True"}]
    assert states([job(name, 7, conditions=done)], [], [name])[name].state == "COMPLETED"
    waiting_image = {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
    container = {"name": "worker", "ready": False, "restartCount": 0, "image": "registry.lab/tuneboard:0.1.0"}
    pulling = pod(name, 7, "Pending", containerStatuses=[container | {"imageID": "", "state": waiting_image}])
    # the kubelet keeps trying (a registry's limit, a Secret made late): shown, not ended
    assert states([job(name, 7, active=1)], [pulling], [name])[name] == k8s.JobState(
        "PENDING", "ImagePullBackOff", None
    )

    server.answer("DELETE", f"{JOBS}/{name}", (200, status(200, "", "deleted")))
    k8s.cancel(client, NAMESPACE, name)
    method, path, query, body = server.requests[-1]
    assert (method, path) == ("DELETE", f"{JOBS}/{name}")
    policy = query.get("propagationPolicy", [(body or {}).get("propagationPolicy")])
    assert policy == ["Background"]  # its pod goes with it
    server.answer("DELETE", f"{JOBS}/{name}", (404, status(404, "NotFound", "jobs.batch not found")))
    k8s.cancel(client, NAMESPACE, name)  # gone already: nothing to do

    server.answer("GET", f"{JOBS}/{name}", (404, status(404, "NotFound", "jobs.batch not found")))
    assert k8s.find(client, NAMESPACE, name) is None
    server.answer("GET", f"{JOBS}/{name}", (200, job(name, 7, active=1)))
    assert k8s.find(client, NAMESPACE, name) == name


def test_the_api_servers_refusals_and_silence_are_sentences(settings, server):
    write(settings, BASE)
    provider = load(settings)["cloud"]
    client = server.client()
    manifest = k8s.manifest(provider, 7, "tuneboard-x-run-7-1", INSTALL, {})
    forbidden = (
        'jobs.batch is forbidden: User "system:serviceaccount:ml:tuneboard" cannot create resource "jobs"'
    )
    server.answer("POST", JOBS, (403, status(403, "Forbidden", forbidden)))
    with pytest.raises(k8s.KubernetesError) as refused:
        k8s.submit(client, manifest)
    assert forbidden in str(refused.value) and "HTTP 403" in str(refused.value)
    assert not refused.value.unreachable
    # too many requests: asked again later, not a refusal
    server.answer(
        "POST", JOBS, (429, status(429, "TooManyRequests", "the server has received too many requests"))
    )
    with pytest.raises(k8s.KubernetesError) as busy:
        k8s.submit(client, manifest)
    assert busy.value.unreachable
    # a create whose answer was lost created the Job: a second one finds it there, and it is ours
    exists = f'jobs.batch "{manifest["metadata"]["name"]}" already exists'
    server.answer("POST", JOBS, (409, status(409, "AlreadyExists", exists)))
    assert k8s.submit(client, manifest) == manifest["metadata"]["name"]

    def silent(*args, **kwargs):
        raise urllib3.exceptions.MaxRetryError(None, "/apis", reason="Connection refused")

    server.request = silent  # type: ignore[method-assign]
    with pytest.raises(k8s.KubernetesError) as unreachable:
        k8s.poll(client, NAMESPACE, INSTALL, ["tuneboard-x-run-7-1"])
    assert unreachable.value.unreachable and "did not answer" in str(unreachable.value)


def test_the_dispatcher_sends_a_run_to_kubernetes_and_cancels_its_job(
    client, settings, db, server, monkeypatch
):
    """A run for a Kubernetes provider becomes a Job whose manifest carries the worker's plain settings and
    the operator's Secret, never the secrets themselves; its pod's wait is shown in the scheduler's words;
    a cancel deletes the Job."""
    from app.models import Run
    from app.providers.dispatch import job_name, tick
    from tests.conftest import DEMO_DATASET, upload

    settings = settings.model_copy(update={"token": SecretStr("k8s-test-token-0123456789")})
    write(settings, BASE | {"secret": "tuneboard-worker", "gpus": 1})
    monkeypatch.setattr(k8s, "api", lambda provider: server.client())
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run_id = client.post("/api/runs", json={"dataset_id": dataset, "provider": "cloud"}).json()["id"]
    name = job_name(settings, run_id, 1)
    server.answer("POST", JOBS, (201, job(name, run_id)))
    server.answer("GET", JOBS, (200, listing("JobList", [job(name, run_id, active=1)])))
    server.answer("GET", PODS, (200, listing("PodList", [pod(name, run_id, "Pending", **UNSCHEDULABLE)])))
    providers = load(settings)
    tick(settings, db, providers)  # submitted
    tick(settings, db, providers)  # watched
    posted = next(body for method, path, _, body in server.requests if method == "POST")
    container = posted["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TUNEBOARD_JOB"] == name and env["TUNEBOARD_GENERATION"] == "false"
    assert "TUNEBOARD_TOKEN" not in env and "TUNEBOARD_DATABASE_URL" not in env
    assert "k8s-test-token" not in json.dumps(posted)
    assert container["envFrom"] == [{"secretRef": {"name": "tuneboard-worker"}}]
    with db.session() as session:
        (row,) = session.get(Run, run_id).cluster_jobs
        assert (row.kind, row.job_id, row.state, row.reason) == (
            "kubernetes",
            name,
            "PENDING",
            "Unschedulable",
        )
        assert row.log == f"kubectl logs --namespace {NAMESPACE} job/{name}"
    page = client.get(f"/runs/{run_id}").text
    assert "cloud (Kubernetes, namespace ml)" in page and "Unschedulable" in page

    assert client.post(f"/api/runs/{run_id}/cancel").status_code == 200
    server.answer("DELETE", f"{JOBS}/{name}", (200, status(200, "", "deleted")))
    tick(settings, db, providers)
    assert ("DELETE", f"{JOBS}/{name}") in [(m, p) for m, p, _, _ in server.requests]
