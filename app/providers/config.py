"""Compute providers: the clusters a team already has (Slurm, Kubernetes), configured by an operator in one
file that they review, `<data dir>/providers.yaml`, never from a page. A run sent to a provider becomes one
scheduler job that starts a one-shot worker for exactly that run (app.providers.dispatch).

    providers:
      - name: lab                  # what New run offers, and what a run's "provider" names
        kind: slurm
        server_url: http://tuneboard.lab:8000   # where the jobs reach this web server
        partition: gpu
        account: nlp
        qos: normal
        time_limit: "04:00:00"
        gpus: 1                    # --gpus=1 (or gres: "gpu:a100:1")
        cpus_per_task: 8
        memory: 64G
        sbatch_options: ["--constraint=a100"]
        setup: ["module load cuda/12.4", "source /opt/tuneboard/.venv/bin/activate"]

      - name: cloud
        kind: kubernetes
        namespace: ml
        image: registry.lab/tuneboard:0.1.0
        secret: tuneboard-worker           # a Secret with TUNEBOARD_TOKEN and TUNEBOARD_DATABASE_URL
        gpus: 1                            # of gpu_resource (default nvidia.com/gpu)
        node_selector: {cloud.google.com/gke-accelerator: nvidia-l4}
        tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
        pod_template: {priorityClassName: batch-low}   # merged over the pod's spec

Every value is checked here: one line each, options of the form --name[=value], times and sizes in
Slurm's forms; a Kubernetes provider's Job is built and checked against the API's schema when the file is
read. A page only ever chooses a provider by its name.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.config import Settings

FILE_NAME = "providers.yaml"
NAME = r"^[a-z0-9][a-z0-9-]{0,39}$"
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")  # minutes, [D-]HH[:MM[:SS]]
SLURM_SIZE = re.compile(r"^\d+[KMGT]?$")
OPTION = re.compile(r"^--[a-z][a-z0-9-]*(=[^\s'\"`$\\;|&<>]+)?$")


class ProviderProblem(ValueError):
    """The providers file cannot be used, with its sentence."""


def _one_line(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("must be one line")
    return value


Line = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_one_line)]
Word = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:+-]{1,100}$")]


def _option(value: str) -> str:
    if not OPTION.fullmatch(value):
        raise ValueError("an sbatch option is written --name or --name=value, without spaces or quotes")
    return value


def _time(value: str) -> str:
    if not SLURM_TIME.fullmatch(value):
        raise ValueError("a time limit is minutes or [days-]hours:minutes:seconds, such as 04:00:00")
    return value


def _size(value: str) -> str:
    if not SLURM_SIZE.fullmatch(value):
        raise ValueError("a memory size is a number with K, M, G or T, such as 64G")
    return value


class SlurmProvider(BaseModel):
    """A Slurm cluster: each run becomes one `sbatch` job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    kind: Literal["slurm"]
    # where the jobs reach this web server (their workers send files over HTTP); default: its own address
    server_url: Line | None = None
    partition: Word | None = None
    account: Word | None = None
    qos: Word | None = None
    time_limit: Annotated[str, AfterValidator(_time)] | None = None
    gpus: int | None = Field(None, ge=0, le=64)
    gres: Word | None = None
    cpus_per_task: int | None = Field(None, ge=1, le=1024)
    memory: Annotated[str, AfterValidator(_size)] | None = None
    sbatch_options: list[Annotated[str, AfterValidator(_option)]] = Field(default_factory=list, max_length=50)
    # shell lines the job runs before its worker: load modules, activate an environment, enter a container
    setup: list[Line] = Field(default_factory=list, max_length=50)
    python: Line | None = None  # the interpreter on the nodes (default: the one running this server)
    # where the jobs start and write their logs, a folder the nodes have (default: the run's folder under
    # <data dir>/clusters, which the nodes must then share with this server)
    job_folder: Line | None = None
    # how long before the time limit Slurm warns the job (SIGTERM), so its worker hands the run back
    warning_seconds: int = Field(120, ge=10, le=3600)
    environment: dict[Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]{0,63}$")], Line] = Field(
        default_factory=dict
    )  # more variables for the job's worker (TUNEBOARD_* ones the operator chooses)

    @property
    def label(self) -> str:
        return f"{self.name} (Slurm{f', partition {self.partition}' if self.partition else ''})"


def seconds(limit: str) -> int:
    """A time limit in Slurm's forms (minutes, [days-]hours[:minutes[:seconds]]) in seconds."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if not days and len(parts) == 1:
        return parts[0] * 60
    hours, minutes, secs = (parts + [0, 0])[:3]
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + secs


DNS_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"


class KubernetesProvider(BaseModel):
    """A Kubernetes cluster: each run becomes one `batch/v1` Job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    kind: Literal["kubernetes"]
    server_url: Line | None = None
    namespace: str = Field(pattern=DNS_NAME)
    image: Line  # Tuneboard's image, with torch for the nodes' GPUs
    # a Secret of the operator's with the worker's TUNEBOARD_DATABASE_URL (and TUNEBOARD_TOKEN), by envFrom
    secret: str = Field(pattern=DNS_NAME)
    gpu_resource: str = Field("nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    gpus: int | None = Field(None, ge=0, le=64)
    cpu: str | None = Field(None, pattern=QUANTITY)
    memory: str | None = Field(None, pattern=QUANTITY)
    node_selector: dict[Annotated[str, Field(max_length=253)], Line] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list, max_length=50)
    service_account: str | None = Field(None, pattern=DNS_NAME)
    pod_template: dict[str, Any] = Field(default_factory=dict)  # merged over the pod's spec
    container_template: dict[str, Any] = Field(default_factory=dict)  # merged over the worker's container
    time_limit: Annotated[str, AfterValidator(_time)] | None = None
    python: Line | None = None  # the interpreter in the image (default: python)
    warning_seconds: int = Field(120, ge=10, le=3600)  # the pod's grace period when its Job is deleted
    environment: dict[Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]{0,63}$")], Line] = Field(
        default_factory=dict
    )
    context: Line | None = None  # the kubeconfig's context (default: its current one)
    in_cluster: bool = False  # this web server runs in the cluster: its pod's service account

    @property
    def label(self) -> str:
        return f"{self.name} (Kubernetes, namespace {self.namespace})"

    @property
    def time_limit_seconds(self) -> int | None:
        return seconds(self.time_limit) if self.time_limit else None

    @model_validator(mode="after")
    def _job_is_valid(self) -> KubernetesProvider:
        """The Job this provider would submit, checked against the Kubernetes API's schema now, not at the
        first run."""
        from app.providers.kubernetes import manifest, validate

        if "containers" in self.pod_template:
            raise ValueError(
                "pod_template cannot set containers (it would replace the worker's): put the worker "
                "container's additions (volumeMounts, securityContext…) in container_template"
            )
        validate(manifest(self, 1, "tuneboard-check-run-1-1", "check", {"TUNEBOARD_GENERATION": "false"}))
        return self


Provider = Annotated[SlurmProvider | KubernetesProvider, Field(discriminator="kind")]


class ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: list[Provider] = Field(default_factory=list, max_length=100)


def providers_file(settings: Settings) -> Path:
    return settings.data_dir / FILE_NAME


def load(settings: Settings) -> dict[str, Provider]:
    """The configured providers by name; none when the file does not exist. ProviderProblem with a
    sentence for a file that cannot be used. Read again only when the file changes."""
    path = providers_file(settings)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ProviderProblem(f"{path} cannot be read: {exc.strerror}.") from None
    return dict(_load(str(path), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=8)
def _load(name: str, _mtime: int, _size: int) -> tuple[tuple[str, Provider], ...]:
    import yaml

    path = Path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProviderProblem(f"{path} cannot be read: {exc.strerror}.") from None
    try:
        parsed = ProvidersFile.model_validate(yaml.safe_load(text) or {})
    except yaml.YAMLError as exc:
        raise ProviderProblem(f"{path} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ProviderProblem(f"{path}: {where}: {first['msg']}") from None
    names = [p.name for p in parsed.providers]
    if len(set(names)) != len(names):
        raise ProviderProblem(f"{path} names a provider twice: each name must be its own.")
    return tuple((p.name, p) for p in parsed.providers)
