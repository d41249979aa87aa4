"""The job queue: the one set of rules by which workers take background work from the database.

A job is a row of a table with the lease columns (`app.models.Leased`): a run to train, an export to
make, a model to download. Each kind is one `Kind` in KINDS: its table, what a worker must have to serve
it, and what its row becomes when its worker goes silent too often. Every claim, heartbeat, hand-back,
end and stale check goes through the functions below, and every attempt is a row of `job_attempts` (which
worker, when, how it ended), so every kind counts attempts the same way. What a job's row means beyond its
lease stays with its owner: the run state machine (app.runs.state), app.exports and app.downloads call this
module for the lease.

    queued ──claim──▶ running ──end──▶ the kind's finished states
      ▲                  │
      ├──hand_back───────┤  the worker stopped on purpose: the attempt does not count against the job
      └──requeue_stale───┘  the worker went silent: after MAX_LOST such attempts the job fails

Claims are atomic: SQLite serialises them through BEGIN IMMEDIATE (writers pass a session from
`Database.write_session()`), PostgreSQL through FOR UPDATE SKIP LOCKED (SQLite's compiler leaves that
clause out), so several workers can share one queue. Each function commits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import (
    Export,
    ExportStatus,
    JobAttempt,
    Leased,
    ModelDownload,
    Publication,
    Run,
    RunStatus,
    utcnow,
)
from app.workers import FETCHES

QUEUED, RUNNING = "queued", "running"
MAX_LOST = 3  # attempts whose worker went silent before the job fails
REQUEUED, LOST = "requeued", "lost"  # how an attempt ended when its job went back to the queue


@dataclass(frozen=True)
class Kind:
    """One kind of job. `serves(models, gpus)`: the conditions a worker with those base models and GPUs
    meets (None: any); `claimed` and `handed_back`: the kind's own columns set on a claim and on a return to
    the queue; `silent_end(row, lost)`: what a row whose worker went silent becomes instead of queued again
    (its final values), or None to requeue it."""

    name: str
    table: type[Leased]
    serves: Callable[[Sequence[str] | None, int | None], list[ColumnElement[bool]]]
    silent_end: Callable[[Any, int], dict[str, Any] | None]
    claimed: dict[str, Any] = field(default_factory=dict)
    handed_back: dict[str, Any] = field(default_factory=dict)
    web_disk: bool = False  # only a worker sharing the web server's disk takes it


def _run_serves(models: Sequence[str] | None, gpus: int | None) -> list[ColumnElement[bool]]:
    # a run sent to a compute provider is its scheduler job's worker's alone (claimed with `only`)
    conditions: list[ColumnElement[bool]] = [Run.provider.is_(None)]
    if models is not None:
        have = Run.base_model.in_(models)
        conditions.append(or_(have, Run.base_model.contains("/")) if FETCHES in models else have)
    if gpus is not None:
        conditions.append(Run.gpus <= gpus)
    return conditions


def _run_silent_end(run: Any, lost: int) -> dict[str, Any] | None:
    if run.cancel_requested:
        return {"status": RunStatus.CANCELLED}
    if lost >= MAX_LOST:
        return {
            "status": RunStatus.FAILED,
            "error": f"The worker running this run stopped responding {lost} times; giving up.",
        }
    return None


def _export_serves(models: Sequence[str] | None, gpus: int | None) -> list[ColumnElement[bool]]:
    if models is None:
        return []
    return [Export.run_id.in_(select(Run.id).where(Run.base_model.in_(models)))]


def _export_silent_end(export: Any, lost: int) -> dict[str, Any] | None:
    if lost < MAX_LOST:
        return None
    return {
        "status": ExportStatus.FAILED,
        "stage": None,
        "error": f"The worker making this export stopped responding {lost} times (most often it ran out of "
        "memory). Free some memory or choose a smaller format, then try again.",
    }


TRAIN = Kind("train", Run, _run_serves, _run_silent_end, claimed={"error": None})
EXPORT = Kind(
    "export",
    Export,
    _export_serves,
    _export_silent_end,
    claimed={"progress": 0.0, "stage": None},
    handed_back={"progress": 0.0, "stage": None, "started_at": None},
)


def _any_worker(models: Sequence[str] | None, gpus: int | None) -> list[ColumnElement[bool]]:
    return []


def _transfer_silent_end(gave_up: str) -> Callable[[Any, int], dict[str, Any] | None]:
    """A download's or a push's end when its worker went silent: cancelled if that was asked for, failed
    with `gave_up` (formatted with the count) after MAX_LOST silences, else queued again."""

    def silent_end(row: Any, lost: int) -> dict[str, Any] | None:
        if row.cancel_requested:
            return {"status": "cancelled", "speed": None}
        if lost < MAX_LOST:
            return None
        return {"status": "failed", "speed": None, "error": gave_up.format(lost=lost)}

    return silent_end


# a model fetched by name goes to the Hugging Face cache of the machine the web server lists models from
DOWNLOAD = Kind(
    "download",
    ModelDownload,
    _any_worker,
    _transfer_silent_end(
        "The worker downloading this model stopped responding {lost} times. Download it again to resume "
        "from the files that arrived."
    ),
    handed_back={"speed": None},
    web_disk=True,
)


# the files pushed are on the web server's disk (the run's adapter, its exports)
PUBLISH = Kind(
    "publish",
    Publication,
    _any_worker,
    _transfer_silent_end("The worker publishing this stopped responding {lost} times. Publish it again."),
    handed_back={"speed": None},
    web_disk=True,
)
# a worker looks in this order: someone waits for an export's file or a model's, and a run may wait on it
KINDS = {kind.name: kind for kind in (EXPORT, DOWNLOAD, PUBLISH, TRAIN)}


def claim(
    *,
    session: Session,
    kind: Kind,
    worker_id: str,
    models: Sequence[str] | None = None,
    gpus: int | None = None,
    only: int | None = None,
) -> Any | None:
    """Atomically take the oldest queued job of `kind` that a worker with `models` and `gpus` can serve (or
    exactly the job `only`, for a scheduler job's one-shot worker), and open its attempt. Returns the row,
    or None when there is none."""
    table, now = kind.table, utcnow()
    serves = [table.id == only] if only is not None else kind.serves(models, gpus)  # type: ignore[attr-defined]
    oldest = (
        select(table.id)  # type: ignore[attr-defined]
        .where(table.status == QUEUED, *serves)
        .order_by(table.id)  # type: ignore[attr-defined]
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claimed = session.execute(
        update(table)
        .where(table.id == oldest, table.status == QUEUED)  # type: ignore[attr-defined]
        .values(
            status=RUNNING,
            worker_id=worker_id,
            attempts=table.attempts + 1,
            heartbeat_at=now,
            started_at=func.coalesce(table.started_at, now),
            **kind.claimed,
        )
        .returning(table.id)  # type: ignore[attr-defined]
    ).scalar_one_or_none()
    if claimed is None:
        session.rollback()
        return None
    row = session.get(table, claimed, populate_existing=True)
    assert row is not None
    session.add(
        JobAttempt(kind=kind.name, job_id=claimed, attempt=row.attempts, worker_id=worker_id, started_at=now)
    )
    session.commit()
    return row


def claim_next(
    *,
    session: Session,
    worker_id: str,
    models: Sequence[str] | None = None,
    gpus: int | None = None,
    shared_disk: bool = True,
) -> tuple[Kind, Any] | None:
    """The next job of any kind this worker can serve, kinds in KINDS' order: (its kind, its row). A worker
    without the web server's disk (`shared_disk` False) takes none of the kinds that need it (`web_disk`)."""
    for kind in KINDS.values():
        if kind.web_disk and not shared_disk:
            continue
        row = claim(session=session, kind=kind, worker_id=worker_id, models=models, gpus=gpus)
        if row is not None:
            return kind, row
    return None


def waiting(
    *,
    session: Session,
    models: Sequence[str] | None = None,
    gpus: int | None = None,
    shared_disk: bool = True,
) -> bool:
    """Whether a queued job of any kind waits that a worker with `models` and `gpus` could claim (by
    `claim_next`'s rules: without the web server's disk, no kind that needs it)."""
    return any(
        session.scalar(
            select(kind.table.id)  # type: ignore[attr-defined]
            .where(kind.table.status == QUEUED, *kind.serves(models, gpus))
            .limit(1)
        )
        is not None
        for kind in KINDS.values()
        if shared_disk or not kind.web_disk
    )


def _held(kind: Kind, job_id: int, worker_id: str):
    """An update of the job only while `worker_id` holds it."""
    table = kind.table
    return update(table).where(
        table.id == job_id,  # type: ignore[attr-defined]
        table.status == RUNNING,
        table.worker_id == worker_id,
    )


def beat(
    *, session: Session, kind: Kind, job_id: int, worker_id: str, returning: Any = None, **values: Any
) -> tuple[bool, Any]:
    """The worker's heartbeat on its job, with any of the kind's columns (progress…). Returns (whether the
    worker still holds the job, the `returning` column's value): a job that was handed to another worker
    or has ended is not its own any more, and the worker should stop."""
    table = kind.table
    statement = _held(kind, job_id, worker_id).values(heartbeat_at=utcnow(), **values)
    statement = statement.returning(returning if returning is not None else table.id)  # type: ignore[attr-defined]
    row = session.execute(statement).one_or_none()
    session.commit()
    return (row is not None, row[0] if row is not None else None)


def _close_attempt(session: Session, kind: Kind, job_id: int, outcome: str) -> None:
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.kind == kind.name, JobAttempt.job_id == job_id, JobAttempt.ended_at.is_(None))
        .values(ended_at=utcnow(), outcome=outcome)
    )


def end(*, session: Session, kind: Kind, job_id: int, worker_id: str, status: str, **values: Any) -> bool:
    """The worker finished its job with `status` (one of the kind's finished states). False: it no longer
    held the job (it was handed to another worker), and nothing changed."""
    ended = session.execute(
        _held(kind, job_id, worker_id).values(status=status, finished_at=utcnow(), worker_id=None, **values)
    ).rowcount  # type: ignore[attr-defined]
    if ended:
        _close_attempt(session, kind, job_id, status)
    session.commit()
    return bool(ended)


def transfer_beat(
    *, session: Session, kind: Kind, job_id: int, worker_id: str, done: int, speed: float | None
) -> bool:
    """A download's or a push's heartbeat with the bytes moved so far. False: stop (it was cancelled, or is no
    longer this worker's)."""
    ours, cancel_requested = beat(
        session=session,
        kind=kind,
        job_id=job_id,
        worker_id=worker_id,
        returning=kind.table.cancel_requested,  # type: ignore[attr-defined]
        bytes_done=done,
        speed=speed,
    )
    return ours and not cancel_requested


def transfer_end(
    *,
    session: Session,
    kind: Kind,
    job_id: int,
    worker_id: str,
    status: str,
    error: str | None,
    **values: Any,
) -> bool:
    """A download or a push ends: no speed any more, its error (kept short), every byte counted on success."""
    values |= {"speed": None, "error": error[:4000] if error else None}
    if status == "succeeded":
        row = session.get(kind.table, job_id)
        values["bytes_done"] = row.bytes_total if row is not None else 0  # type: ignore[attr-defined]
    return end(session=session, kind=kind, job_id=job_id, worker_id=worker_id, status=status, **values)


def hand_back(*, session: Session, kind: Kind, job_id: int, worker_id: str) -> bool:
    """The worker stops before the job is done: it goes back to the queue (a run resumes from its last
    checkpoint), and the attempt does not count against the job."""
    handed = session.execute(
        _held(kind, job_id, worker_id).values(
            status=QUEUED, worker_id=None, heartbeat_at=None, **kind.handed_back
        )
    ).rowcount  # type: ignore[attr-defined]
    if handed:
        _close_attempt(session, kind, job_id, REQUEUED)
    session.commit()
    return bool(handed)


def lost_attempts(session: Session, kind: Kind, job_id: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(JobAttempt)
            .where(JobAttempt.kind == kind.name, JobAttempt.job_id == job_id, JobAttempt.outcome == LOST)
        )
        or 0
    )


def requeue_stale(
    *, session: Session, stale_after: timedelta, now: datetime | None = None
) -> dict[str, list[int]]:
    """Jobs of every kind whose worker stopped beating for `stale_after` go back to the queue, or end as the
    kind says (a run whose cancel was asked for; MAX_LOST silent attempts). Returns the ids, by kind."""
    cutoff, stale = (now or utcnow()) - stale_after, {}
    for kind in KINDS.values():
        table = kind.table
        rows = session.scalars(
            select(table).where(table.status == RUNNING, table.heartbeat_at < cutoff).with_for_update()
        ).all()
        for row in rows:
            _lose(session, kind, row)
        if rows:
            stale[kind.name] = [row.id for row in rows]  # type: ignore[attr-defined]
    session.commit()
    return stale


def _lose(session: Session, kind: Kind, row: Any) -> None:
    """A running job whose worker is gone: back to the queue, or the kind's end after MAX_LOST such
    attempts (the caller commits)."""
    lost = 1 + lost_attempts(session, kind, row.id)
    final = kind.silent_end(row, lost)
    if final is None:
        values: dict[str, Any] = {
            "status": QUEUED,
            "worker_id": None,
            "heartbeat_at": None,
            **kind.handed_back,
        }
    else:
        values = {"worker_id": None, "finished_at": utcnow(), **final}
    for name, value in values.items():
        setattr(row, name, value)
    _close_attempt(session, kind, row.id, LOST if final is None else final["status"])


def lose(*, session: Session, kind: Kind, job_id: int, worker_id: str) -> bool:
    """The worker holding a job is known to be gone (its scheduler job ended): the job is treated as that
    worker's silence would be, at once. False: that worker no longer held it."""
    table: Any = kind.table
    row = session.scalar(
        select(table)
        .where(table.id == job_id, table.status == RUNNING, table.worker_id == worker_id)
        .with_for_update()
    )
    if row is None:
        return False
    _lose(session, kind, row)
    session.commit()
    return True


def attempts_of(*, session: Session, kind: Kind, job_id: int) -> list[JobAttempt]:
    return list(
        session.scalars(
            select(JobAttempt)
            .where(JobAttempt.kind == kind.name, JobAttempt.job_id == job_id)
            .order_by(JobAttempt.attempt)
        )
    )


def forget(*, session: Session, kind: Kind, job_id: int) -> None:
    """A job's row is being deleted: its attempts go with it (the caller commits)."""
    session.execute(delete(JobAttempt).where(JobAttempt.kind == kind.name, JobAttempt.job_id == job_id))
