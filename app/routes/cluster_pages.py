"""The run page's card for a run sent to a compute provider (Slurm, Kubernetes): its scheduler jobs (the
newest first), what the scheduler says of each, how long it waited, and its log when this server can read
it (else where it is)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from app.deps import RunId, SessionDep, SettingsDep, get_run_or_404
from app.models import ClusterJob, Run, utcnow
from app.providers.config import ProviderProblem, load
from app.runs.folder import file_tail
from app.web import render

router = APIRouter()
LOG_SHOWN = 256 * 1024  # the end of a job's log the page shows

BADGES = {
    "PENDING": "queued",
    "RUNNING": "running",
    "STOPPING": "running",
    "COMPLETED": "succeeded",
    "CANCELLED": "cancelled",
}
# Slurm's most common reasons for a waiting job, in words
REASONS = {
    "Resources": "the resources it asked for are in use",
    "Priority": "jobs with a higher priority come first",
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "PartitionTimeLimit": "its time limit is above the partition's",
    "QOSMaxJobsPerUserLimit": "the QoS limits how many jobs run at once",
    "AssocGrpGRES": "its account's GPU quota is used up",
    "BeginTime": "it may not start yet",
    "JobHeldUser": "it is held (scontrol release lets it run)",
    "JobHeldAdmin": "an administrator holds it",
    # Kubernetes'
    "Unschedulable": "no node has what it asks for (GPUs, memory) free, or none it may run on",
    "ImagePullBackOff": "the image cannot be pulled",
    "ErrImagePull": "the image cannot be pulled",
    "ContainerCreating": "its container is being created",
    "DeadlineExceeded": "its time limit came",
    "PreemptionByScheduler": "the cluster gave its node to another job",
}


@dataclass
class JobView:
    kind: str  # Slurm job | Kubernetes Job
    job_id: str
    state: str
    reason: str | None
    node: str | None
    log: str | None
    log_url: str | None
    waited: float  # seconds in the scheduler's queue (so far, while it waits)
    ran: float | None  # seconds it ran (so far), once it started
    waiting: bool

    @property
    def badge(self) -> str:
        return BADGES.get(self.state, "failed")

    @property
    def explained(self) -> str:
        return REASONS.get(self.reason or "", self.reason or "")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def job_view(settings, run: Run, job: ClusterJob) -> JobView:
    now = utcnow()
    began = job.started_at or (job.ended_at if job.started_at is None else None)
    waited = _seconds(job.submitted_at, began or now) or 0.0
    readable = job.log is not None and _readable_log(settings, job.log) is not None
    return JobView(
        kind="Kubernetes Job" if job.kind == "kubernetes" else "Slurm job",
        job_id=job.job_id,
        state=job.state,
        reason=job.reason,
        node=job.node,
        log=job.log,
        log_url=f"/runs/{run.id}/cluster-jobs/{job.job_id}/log" if readable else None,
        waited=waited,
        ran=_seconds(job.started_at, job.ended_at or now),
        waiting=job.ended_at is None and job.started_at is None,
    )


def _readable_log(settings, path: str) -> Path | None:
    """A job's log, if it is in this server's clusters folder (a filesystem the nodes share) and exists."""
    folder = (settings.data_dir / "clusters").resolve()
    log = Path(path).resolve()
    return log if log.is_relative_to(folder) and log.is_file() else None


def cluster_context(settings, run: Run) -> dict:
    """What the run page's cluster card shows (nothing for a worker's run)."""
    if run.provider is None:
        return {}
    try:
        provider = load(settings).get(run.provider)
    except ProviderProblem:
        provider = None
    return {
        "cluster_label": provider.label if provider else run.provider,
        "cluster_jobs": [job_view(settings, run, job) for job in reversed(run.cluster_jobs)],
    }


@router.get("/runs/{run_id}/cluster-card", response_class=HTMLResponse)
def cluster_card(request: Request, run_id: RunId, settings: SettingsDep, session: SessionDep):
    """The card alone, polled while the run is under way."""
    run = get_run_or_404(session, run_id)
    if run.provider is None:
        raise HTTPException(404, f"Run {run_id} was not sent to a compute provider.")
    context = {"run": run} | cluster_context(settings, run)
    status = 286 if run.status in ("succeeded", "failed", "cancelled") else 200  # htmx: stop polling
    return render(request, "_cluster_jobs.html", context, status=status)


@router.get("/runs/{run_id}/cluster-jobs/{job_id}/log", response_class=PlainTextResponse)
def cluster_log(run_id: RunId, job_id: str, settings: SettingsDep, session: SessionDep):
    run = get_run_or_404(session, run_id)
    job = next((j for j in run.cluster_jobs if j.job_id == job_id), None)
    log = _readable_log(settings, job.log) if job is not None and job.log else None
    if log is None:
        raise HTTPException(404, f"This server cannot read the log of job {job_id[:40]} of run {run_id}.")
    return PlainTextResponse(file_tail(log, LOG_SHOWN))
