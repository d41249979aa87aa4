"""The run state machine. Every status change is one named function here and nowhere else.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      ▲                  │
      └──requeue─────────┘   (worker stopped, or went silent: the run resumes from its checkpoint)
    queued ──cancel──▶ cancelled            running ──cancel──▶ cancel_requested, then cancelled

Writers pass a session from `Database.write_session()` (SQLite: BEGIN IMMEDIATE); each function commits.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.models import FINISHED, Run, RunAttempt, RunMetric, RunStatus, utcnow

MAX_ATTEMPTS = 3


class TransitionError(Exception):
    """The run is not in a state that allows this change."""


def enqueue(
    *, session: Session, name: str, dataset_id: int, base_model: str, method: str, config: dict, gpus: int = 0
) -> Run:
    run = Run(
        gpus=gpus,
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
    """Atomically take the oldest queued run this worker can serve: one on a base model in `models` and
    needing at most `gpus` GPUs (None: any). SQLite serialises this through BEGIN IMMEDIATE;
    PostgreSQL through FOR UPDATE SKIP LOCKED (SQLite's compiler leaves that clause out)."""
    now = utcnow()
    servable = [Run.status == RunStatus.QUEUED]
    if models is not None:
        servable.append(Run.base_model.in_(models))
    if gpus is not None:
        servable.append(Run.gpus <= gpus)
    oldest = (
        select(Run.id)
        .where(*servable)
        .order_by(Run.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claimed = session.execute(
        update(Run)
        .where(Run.id == oldest, Run.status == RunStatus.QUEUED)
        .values(
            status=RunStatus.RUNNING,
            worker_id=worker_id,
            attempts=Run.attempts + 1,
            heartbeat_at=now,
            error=None,
        )
        .returning(Run.id)
    ).scalar_one_or_none()
    if claimed is None:
        session.rollback()
        return None
    session.execute(update(Run).where(Run.id == claimed, Run.started_at.is_(None)).values(started_at=now))
    run = session.get(Run, claimed, populate_existing=True)
    assert run is not None
    session.add(RunAttempt(run_id=claimed, attempt=run.attempts, worker_id=worker_id, started_at=now))
    session.commit()
    return run


def _end_attempt(session: Session, run_id: int, outcome: str) -> None:
    """Close the run's open attempt (the one that just ended) with how it ended."""
    session.execute(
        update(RunAttempt)
        .where(RunAttempt.run_id == run_id, RunAttempt.ended_at.is_(None))
        .values(ended_at=utcnow(), outcome=outcome)
    )


def attempts_of(*, session: Session, run_id: int) -> list[RunAttempt]:
    return list(
        session.scalars(select(RunAttempt).where(RunAttempt.run_id == run_id).order_by(RunAttempt.attempt))
    )


def heartbeat(*, session: Session, run_id: int, worker_id: str) -> bool:
    """Mark the run alive. Returns whether a cancel was requested. Raises TransitionError if this worker
    no longer owns the run (it was requeued and claimed elsewhere)."""
    owned = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.RUNNING, Run.worker_id == worker_id)
        .values(heartbeat_at=utcnow())
        .returning(Run.cancel_requested)
    ).scalar_one_or_none()
    session.commit()
    if owned is None:
        raise TransitionError(f"run {run_id} is no longer owned by {worker_id}")
    return bool(owned)


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
    ended = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.RUNNING, Run.worker_id == worker_id)
        .values(status=status, error=error, exit_code=exit_code, finished_at=utcnow(), worker_id=None)
    )
    if ended.rowcount:  # type: ignore[attr-defined]
        _end_attempt(session, run_id, status)
    session.commit()


def requeue(*, session: Session, run_id: int, worker_id: str) -> None:
    """The worker is stopping: hand the run back so it resumes from its last checkpoint."""
    handed = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.RUNNING, Run.worker_id == worker_id)
        .values(status=RunStatus.QUEUED, worker_id=None, heartbeat_at=None)
    )
    if handed.rowcount:  # type: ignore[attr-defined]
        _end_attempt(session, run_id, "requeued")
    session.commit()


def requeue_stale(*, session: Session, stale_after: timedelta, now: datetime | None = None) -> list[int]:
    """Runs whose worker went silent go back to the queue, or fail once workers have gone silent on them
    MAX_ATTEMPTS times (attempts handed back on purpose, by a stopping worker, do not count)."""
    cutoff = (now or utcnow()) - stale_after
    stale = session.scalars(
        select(Run).where(Run.status == RunStatus.RUNNING, Run.heartbeat_at < cutoff)
    ).all()
    for run in stale:
        silent = 1 + (
            session.scalar(
                select(func.count())
                .select_from(RunAttempt)
                .where(RunAttempt.run_id == run.id, RunAttempt.outcome == "lost")
            )
            or 0
        )
        if run.cancel_requested:
            run.status, run.finished_at, run.worker_id = RunStatus.CANCELLED, utcnow(), None
        elif silent >= MAX_ATTEMPTS:
            run.status, run.finished_at, run.worker_id = RunStatus.FAILED, utcnow(), None
            run.error = f"The worker running this run stopped responding {silent} times; giving up."
        else:
            run.status, run.worker_id, run.heartbeat_at = RunStatus.QUEUED, None, None
        _end_attempt(session, run.id, "lost" if run.status == RunStatus.QUEUED else run.status)
    session.commit()
    return [run.id for run in stale]


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


def ownership(*, session: Session, run_id: int) -> tuple[str, str | None, int, bool, datetime | None]:
    """(status, worker_id, attempts, cancel_requested, heartbeat_at) as the trainer checks them."""
    row = session.execute(
        select(Run.status, Run.worker_id, Run.attempts, Run.cancel_requested, Run.heartbeat_at).where(
            Run.id == run_id
        )
    ).one()
    session.commit()
    return row.status, row.worker_id, row.attempts, row.cancel_requested, row.heartbeat_at
