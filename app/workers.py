"""Workers as the database knows them: each worker writes its own row (status, current run, heartbeat,
its last passing fault), and the pages read them to say which workers are alive and what they do.
The one owner of that table's writes and of what "alive" means."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Worker, utcnow


def beat(
    *,
    session: Session,
    worker_id: str,
    status: str,
    run_id: int | None = None,
    error: str | None = None,
) -> None:
    """Record that `worker_id` is alive and what it is doing (creates its row on the first beat)."""
    host, _, pid = worker_id.rpartition(":")
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, host=host, pid=int(pid) if pid.isdigit() else 0, started_at=utcnow())
        session.add(row)
    row.status, row.current_run_id, row.heartbeat_at = status, run_id, utcnow()
    if error is not None:
        row.last_error = error[:2000]


def stopped(*, session: Session, worker_id: str) -> None:
    row = session.get(Worker, worker_id)
    if row is not None:
        row.status, row.current_run_id, row.heartbeat_at = "stopped", None, utcnow()


def is_alive(worker: Worker, stale_after: float) -> bool:
    return worker.status != "stopped" and utcnow() - worker.heartbeat_at < timedelta(seconds=stale_after)


def list_workers(*, session: Session, stale_after: float) -> list[tuple[Worker, bool]]:
    """Every worker seen in the last day, newest heartbeat first, with whether it is alive."""
    since = utcnow() - timedelta(days=1)
    rows = session.scalars(
        select(Worker).where(Worker.heartbeat_at > since).order_by(Worker.heartbeat_at.desc())
    )
    return [(w, is_alive(w, stale_after)) for w in rows]


def any_alive(*, session: Session, stale_after: float) -> bool:
    since = utcnow() - timedelta(seconds=stale_after)
    return (
        session.scalar(
            select(Worker.id).where(Worker.heartbeat_at > since, Worker.status != "stopped").limit(1)
        )
        is not None
    )
