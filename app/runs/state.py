"""The run state machine. Every status change is one named function here, or one rule of the job queue.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      ▲                  │
      └──requeue─────────┘   (worker stopped, or went silent: the run resumes from its checkpoint)
    queued ──cancel──▶ cancelled            running ──cancel──▶ cancel_requested, then cancelled

A run is a job of the queue (app.jobs, kind `train`): claims, heartbeats, hand-backs, attempts and the
requeueing of runs whose worker went silent follow the queue's one set of rules. Writers pass a session
from `Database.write_session()` (SQLite: BEGIN IMMEDIATE); each function commits.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app import jobs
from app.models import FINISHED, JobAttempt, Run, RunMetric, RunStatus, utcnow


class TransitionError(Exception):
    """The run is not in a state that allows this change."""


def enqueue(
    *,
    session: Session,
    name: str,
    dataset_id: int,
    base_model: str,
    method: str,
    config: dict,
    gpus: int = 0,
    provider: str | None = None,
) -> Run:
    run = Run(
        gpus=gpus,
        provider=provider,
        name=name,
        dataset_id=dataset_id,
        base_model=base_model,
        method=method,
        config=config,
        status=RunStatus.QUEUED,
    )
    session.add(run)
    session.commit()
    return run


def claim_next(
    *, session: Session, worker_id: str, models: list[str] | None = None, gpus: int | None = None
) -> Run | None:
    """Take the oldest queued run this worker can serve: one on a base model in `models` and needing at most
    `gpus` GPUs (None: any). The lease is app.jobs'."""
    return jobs.claim(session=session, kind=jobs.TRAIN, worker_id=worker_id, models=models, gpus=gpus)


def attempts_of(*, session: Session, run_id: int) -> list[JobAttempt]:
    return jobs.attempts_of(session=session, kind=jobs.TRAIN, job_id=run_id)


def heartbeat(*, session: Session, run_id: int, worker_id: str) -> bool:
    """Mark the run alive. Returns whether a cancel was requested. Raises TransitionError if this worker
    no longer owns the run (it was requeued and claimed elsewhere)."""
    owned, cancel = jobs.beat(
        session=session, kind=jobs.TRAIN, job_id=run_id, worker_id=worker_id, returning=Run.cancel_requested
    )
    if not owned:
        raise TransitionError(f"run {run_id} is no longer owned by {worker_id}")
    return bool(cancel)


def fail_queued_on(*, session: Session, base_model: str, error: str) -> None:
    """Runs queued on a base model that no worker will ever have again fail with `error` (the caller
    commits, with the model's removal)."""
    queued = session.scalars(select(Run).where(Run.status == RunStatus.QUEUED, Run.base_model == base_model))
    for run in queued:
        run.status, run.finished_at, run.error = RunStatus.FAILED, utcnow(), error


def owned_run(*, session: Session, run_id: int, worker_id: str) -> Run:
    """The run, if `worker_id` is training it now. LookupError: no such run; TransitionError: another worker
    has it, or it is not running (requeued, finished)."""
    run = session.get(Run, run_id, populate_existing=True)
    if run is None:
        raise LookupError(run_id)
    if run.status != RunStatus.RUNNING or run.worker_id != worker_id:
        elsewhere = f", on {run.worker_id}" if run.worker_id else ""
        raise TransitionError(
            f"Run {run_id} is not being trained by {worker_id} (it is {run.status}{elsewhere})."
        )
    return run


def request_cancel(*, session: Session, run_id: int) -> Run:
    """A queued run is cancelled at once; a running one is flagged and its trainer stops at the next step."""
    run = session.get(Run, run_id, populate_existing=True)
    if run is None:
        raise LookupError(run_id)
    if run.status == RunStatus.QUEUED:
        run.status, run.finished_at, run.cancel_requested = RunStatus.CANCELLED, utcnow(), True
    elif run.status == RunStatus.RUNNING:
        run.cancel_requested = True
    else:
        raise TransitionError(f"Run {run_id} has already {run.status}.")
    session.commit()
    return run


def finish(
    *,
    session: Session,
    run_id: int,
    worker_id: str,
    status: str,
    error: str | None = None,
    exit_code: int | None = None,
) -> None:
    if status not in FINISHED:
        raise ValueError(status)
    jobs.end(
        session=session,
        kind=jobs.TRAIN,
        job_id=run_id,
        worker_id=worker_id,
        status=status,
        error=error,
        exit_code=exit_code,
    )


def requeue(*, session: Session, run_id: int, worker_id: str) -> None:
    """The worker is stopping: hand the run back so it resumes from its last checkpoint."""
    jobs.hand_back(session=session, kind=jobs.TRAIN, job_id=run_id, worker_id=worker_id)


def record_start(
    *, session: Session, run_id: int, total_steps: int, trainable: int, total: int, resumed_from: int | None
) -> None:
    """What the trainer knows before its first step. A resumed run forgets the metrics it will redo."""
    if resumed_from is not None:
        session.execute(delete(RunMetric).where(RunMetric.run_id == run_id, RunMetric.step > resumed_from))
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(
            total_steps=total_steps,
            trainable_params=trainable,
            total_params=total,
            resumed_from_step=resumed_from,
            current_step=resumed_from or 0,
        )
    )
    session.commit()


def metric_values(values: dict[str, Any]) -> dict[str, float | None]:
    """The numbers of a logged point, by name: ints and floats, a NaN or infinity kept as None (JSON has
    no such number, and a trainer logs one for a diverged loss or a batch without chosen answers: the key
    says it was logged); anything else a trainer logged is not a metric."""
    return {
        str(k): float(v) if math.isfinite(v) else None
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def record_metric(*, session: Session, run_id: int, values: dict) -> None:
    """One short transaction per logged point: `values` has its `kind` and `step`, and any numeric keys."""
    rest = {k: v for k, v in values.items() if k not in ("kind", "step")}
    kind, step = values["kind"], int(values["step"])
    session.add(RunMetric(run_id=run_id, kind=kind, step=step, values=metric_values(rest)))
    if kind == "train":
        session.execute(update(Run).where(Run.id == run_id).values(current_step=step))
    session.commit()


def record_phase(*, session: Session, run_id: int, phase: str | None) -> None:
    """What the run is doing now, in words (None: nothing to say beyond its step)."""
    session.execute(update(Run).where(Run.id == run_id).values(phase=phase[:200] if phase else None))
    session.commit()


def record_step(*, session: Session, run_id: int, step: int) -> None:
    """The step training reached when it ended (the last logged one may be a few steps before it)."""
    session.execute(update(Run).where(Run.id == run_id).values(current_step=step))
    session.commit()


def ownership(*, session: Session, run_id: int) -> tuple[str, str | None, int, bool, datetime | None]:
    """(status, worker_id, attempts, cancel_requested, heartbeat_at) as the trainer checks them."""
    row = session.execute(
        select(Run.status, Run.worker_id, Run.attempts, Run.cancel_requested, Run.heartbeat_at).where(
            Run.id == run_id
        )
    ).one()
    session.commit()
    return row.status, row.worker_id, row.attempts, row.cancel_requested, row.heartbeat_at
