"""What the dispatcher asks of any scheduler, one class per kind of provider: submit a run's job, say what
became of jobs, find a job an interrupted submission left, cancel one. Slurm's answers through its
commands (app.providers.slurm), Kubernetes' through its API (app.providers.kubernetes)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from app.providers import kubernetes, slurm
from app.providers.config import KubernetesProvider, Provider, SlurmProvider
from app.providers.slurm import JobState

# the worker's settings that are secrets: a Kubernetes Job takes them from the operator's Secret instead
SECRETS = ("TUNEBOARD_TOKEN", "TUNEBOARD_DATABASE_URL")


class Backend(Protocol):
    kind: str  # the scheduler's name, for sentences

    def submit(self, run_id: int, name: str, folder: Path, worker_env: dict[str, str]) -> tuple[str, str]:
        """Submit the run's job: (its id, where its log is)."""
        ...

    def find(self, name: str) -> str | None: ...

    def poll(self, job_ids: list[str]) -> dict[str, JobState]: ...

    def cancel(self, job_id: str) -> None: ...


class SlurmBackend:
    kind = "Slurm"

    def __init__(self, provider: SlurmProvider | None) -> None:
        self.provider = provider
        self.env = slurm.job_environment(provider, {})  # without a provider: this server's own settings

    def submit(self, run_id: int, name: str, folder: Path, worker_env: dict[str, str]) -> tuple[str, str]:
        assert self.provider is not None
        where = slurm.job_folder(self.provider, folder)
        text = slurm.script(self.provider, run_id, where, name)
        job_id = slurm.submit(text, folder, slurm.job_environment(self.provider, worker_env), chdir=where)
        return job_id, str(slurm.log_file(where, run_id, job_id))

    def find(self, name: str) -> str | None:
        return slurm.find(name, env=self.env)

    def poll(self, job_ids: list[str]) -> dict[str, JobState]:
        return slurm.poll(job_ids, env=self.env)

    def cancel(self, job_id: str) -> None:
        slurm.cancel(job_id, env=self.env)


class KubernetesBackend:
    kind = "Kubernetes"

    def __init__(self, provider: KubernetesProvider, install: str) -> None:
        self.provider, self.install = provider, install
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = kubernetes.api(self.provider)
        return self._client

    def submit(self, run_id: int, name: str, folder: Path, worker_env: dict[str, str]) -> tuple[str, str]:
        plain = {k: v for k, v in worker_env.items() if k not in SECRETS} | self.provider.environment
        plain["TUNEBOARD_JOB"] = name  # the worker's name carries its job's
        job = kubernetes.manifest(self.provider, run_id, name, self.install, plain)
        kubernetes.validate(job)
        job_id = kubernetes.submit(self.client, job)
        return job_id, f"kubectl logs --namespace {self.provider.namespace} job/{job_id}"

    def find(self, name: str) -> str | None:
        return kubernetes.find(self.client, self.provider.namespace, name)

    def poll(self, job_ids: list[str]) -> dict[str, JobState]:
        return kubernetes.poll(self.client, self.provider.namespace, self.install, job_ids)

    def cancel(self, job_id: str) -> None:
        kubernetes.cancel(self.client, self.provider.namespace, job_id)


def backend(kind: str, provider: Provider | None, install: str) -> Backend | None:
    """The backend for a provider of `kind`; for a provider gone from the file, a Slurm one with this
    server's own settings, or None for a Kubernetes one (nothing says where its cluster is)."""
    if provider is not None and provider.kind != kind:  # the name now stands for another kind of cluster
        provider = None
    if isinstance(provider, KubernetesProvider):
        return KubernetesBackend(provider, install)
    if kind == "slurm":
        return SlurmBackend(provider if isinstance(provider, SlurmProvider) else None)
    return None
