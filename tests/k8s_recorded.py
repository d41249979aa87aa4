"""Answers of a Kubernetes API server, written by hand in the shapes its reference gives for batch/v1 Jobs,
v1 Pods, lists and Status errors (no cluster could run where they were written), and a stand-in for the
official client's connection pool that replays them: the client's own request building, serialisation and
deserialisation run; only the network is replaced.

`RecordedApiServer.answers` maps (method, path) to a list of (status, body) replayed in order (the last one
repeats); `requests` records (method, path, query, body) of every call."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import urllib3

NAMESPACE = "ml"
INSTALL = "5e1f0c2a"


def job(name: str, run_id: int, *, active: int = 0, conditions: list[dict] | None = None) -> dict[str, Any]:
    labels = {"tuneboard.dev/installation": INSTALL, "tuneboard.dev/run": str(run_id)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": "0b6c4d1e-8a53-4a53-9a0f-2f1c1d7e5a11",
            "resourceVersion": "3094415",
            "creationTimestamp": "2026-12-08T09:14:03Z",
            "labels": labels,
        },
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "worker", "image": "registry.lab/tuneboard:0.1.0"}],
                },
            },
        },
        "status": {
            "active": active or None,
            "startTime": "2026-12-08T09:14:03Z",
            "conditions": conditions,
        },
    }


def pod(job_name: str, run_id: int, phase: str, **status: Any) -> dict[str, Any]:
    labels = {
        "tuneboard.dev/installation": INSTALL,
        "tuneboard.dev/run": str(run_id),
        "job-name": job_name,
        "batch.kubernetes.io/job-name": job_name,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{job_name}-x7k2p", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "nodeName": status.pop("node", None),
            "containers": [{"name": "worker", "image": "registry.lab/tuneboard:0.1.0"}],
        },
        "status": {"phase": phase, **status},
    }


def listing(kind: str, items: list[dict]) -> dict[str, Any]:
    return {
        "apiVersion": "v1" if kind == "PodList" else "batch/v1",
        "kind": kind,
        "metadata": {},
        "items": items,
    }


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


UNSCHEDULABLE = {
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ]
}


class RecordedApiServer:
    """Stands in for the client's urllib3 pool manager."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[tuple[int, dict]]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []

    def answer(self, method: str, path: str, *replies: tuple[int, dict]) -> None:
        self.answers[(method, path)] = list(replies)

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.HTTPResponse:
        parts = urlsplit(url)
        body = kwargs.get("body")
        self.requests.append((method, parts.path, parse_qs(parts.query), json.loads(body) if body else None))
        replies = self.answers.get((method, parts.path))
        if not replies:
            code, payload = 404, status(404, "NotFound", f"the server could not find {parts.path}")
        else:
            code, payload = replies.pop(0) if len(replies) > 1 else replies[0]
        return urllib3.HTTPResponse(
            body=json.dumps(payload).encode(),
            status=code,
            headers={"Content-Type": "application/json"},
            preload_content=True,
            reason={
                200: "OK",
                201: "Created",
                403: "Forbidden",
                404: "Not Found",
                422: "Unprocessable Entity",
            }.get(code, "Error"),
        )

    def client(self):
        """An ApiClient of the official client whose connection pool is this stand-in."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = "https://k8s.lab.example:6443"
        api = client.ApiClient(configuration)
        api.rest_client.pool_manager = self
        return api
