"""Workers as the database knows them: each worker writes its own row (status, current run, heartbeat,
its last passing fault), and the pages read them to say which workers are alive and what they do.
The one owner of that table's writes and of what "alive" means."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Run, RunStatus, Worker, utcnow

WORKER_HEADER = "X-Tuneboard-Worker"  # names the worker sending a run's files to the web server
LOG_OFFSET_HEADER = "X-Tuneboard-Log-Offset"  # where in its copy of the log a worker's bytes start


@dataclass(frozen=True)
class Capabilities:
    """What a worker has: its hardware ({"cpus", "memory_mb", "gpus": [{"name", "memory_mb"}]}) and the
    base models it can load. It claims only runs these serve."""

    hardware: dict
    models: list[str]

    @property
    def gpus(self) -> int:
        return len(self.hardware.get("gpus") or [])


@dataclass(frozen=True)
class Orders:
    """What the Workers page asked of a worker: take no new runs, or stop now."""

    drain: bool = False
    stop: bool = False


def worker_id(job: str | None = None) -> str:
    """This process's name in the workers table: host and process id, with the scheduler job that started
    it, if one did (app.providers.dispatch knows its jobs' workers by it)."""
    return f"{socket.gethostname()}:{f'job-{job}:' if job else ''}{os.getpid()}"


def beat(
    *,
    session: Session,
    worker_id: str,
    status: str,
    run_id: int | None = None,
    error: str | None = None,
    capabilities: Capabilities | None = None,
) -> Orders:
    """Record that `worker_id` is alive and what it is doing (creates its row on the first beat), and
    return the orders the Workers page left for it."""
    host, _, pid = worker_id.rpartition(":")
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, host=host, pid=int(pid) if pid.isdigit() else 0, started_at=utcnow())
        session.add(row)
    row.status, row.current_run_id, row.heartbeat_at = status, run_id, utcnow()
    if error is not None:
        row.last_error = error[:2000]
    if capabilities is not None:
        row.hardware, row.models, row.gpus = capabilities.hardware, capabilities.models, capabilities.gpus
    return Orders(drain=bool(row.draining), stop=bool(row.stop_requested))


Order = Literal["drain", "undrain", "stop"]


def order(*, session: Session, worker_id: str, what: Order) -> Worker:
    """Leave an order for a worker (it reads it at its next heartbeat). LookupError: no such worker."""
    row = session.get(Worker, worker_id)
    if row is None:
        raise LookupError(worker_id)
    if what == "stop":
        row.stop_requested = True
    else:
        row.draining = what == "drain"
    return row


def started(*, session: Session, worker_id: str) -> None:
    """A worker process starts: the orders left for an earlier process of the same name do not apply."""
    row = session.get(Worker, worker_id)
    if row is not None:
        row.draining, row.stop_requested, row.started_at, row.last_error = False, False, utcnow(), None
    session.commit()


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


def measuring(*, session: Session, stale_after: float) -> bool:
    """Whether a live worker is measuring its speed now (worker.probe)."""
    found = list_workers(session=session, stale_after=stale_after)
    return any(alive and worker.status == MEASURING for worker, alive in found)


MEASURING = "measuring"  # a worker's status while its speed trial runs
# In a worker's models: it fetches a model named owner/name from its hub itself when it lacks it (a worker
# without the web server's disk, on a machine that reaches the hub).
FETCHES = "owner/name from the hub"


def can_load(models: list[str] | None, base_model: str) -> bool:
    """Whether a worker announcing `models` (None: it did not say) can train a run of `base_model`."""
    return models is None or base_model in models or (FETCHES in models and "/" in base_model)


def waiting_reason(*, session: Session, run: Run, stale_after: float) -> str | None:
    """Why a queued run is not being taken although workers are alive (no alive worker at all is every
    page's banner), or None."""
    if run.status != RunStatus.QUEUED:
        return None
    alive = [w for w, up in list_workers(session=session, stale_after=stale_after) if up]
    if not alive:
        return None
    taking = [w for w in alive if not w.draining and not w.stop_requested]
    if not taking:
        return "Every worker that is running is draining: this run waits until one takes runs again."
    loading = [w for w in taking if can_load(w.models, run.base_model)]
    if not loading:
        return f"No worker that is running can load {run.base_model}: this run waits for one that can."
    if run.gpus and not any(w.gpus >= run.gpus for w in loading):
        most = max(w.gpus for w in loading)
        return (
            f"This run needs {run.gpus} GPU{'s' if run.gpus > 1 else ''}; the workers running that can load "
            f"its model have at most {most}. It waits for a worker with enough."
        )
    return None
