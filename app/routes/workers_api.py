"""JSON API for workers: what each one announced and whether it is alive, and the Workers page's orders
(drain, undrain, stop) for scripts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from app import workers
from app.deps import SessionDep, SettingsDep, WriteSessionDep

router = APIRouter(prefix="/api/workers", tags=["workers"])


class WorkerOut(BaseModel):
    id: str
    host: str
    pid: int
    status: str  # idle | training | stopped
    alive: bool
    current_run_id: int | None
    heartbeat_at: datetime
    started_at: datetime
    # {"cpus", "memory_mb", "free_memory_mb", "gpus": [{"name", "memory_mb"}]}
    hardware: dict[str, Any] | None
    models: list[str] | None  # the base models it can load
    gpus: int
    draining: bool
    stop_requested: bool
    last_error: str | None


class OrderIn(BaseModel):
    what: workers.Order


def _out(worker, alive: bool) -> WorkerOut:
    fields = {name: getattr(worker, name) for name in WorkerOut.model_fields if name != "alive"}
    return WorkerOut(alive=alive, **fields)


@router.get("")
def list_workers(settings: SettingsDep, session: SessionDep) -> list[WorkerOut]:
    """Every worker seen in the last day, newest report first."""
    seen = workers.list_workers(session=session, stale_after=settings.stale_after_seconds)
    return [_out(w, alive) for w, alive in seen]


@router.post("/{worker_id}/orders")
def order_worker(
    worker_id: str, order: OrderIn, settings: SettingsDep, session: WriteSessionDep
) -> WorkerOut:
    """Drain, undrain or stop a worker; it obeys at its next report."""
    try:
        row = workers.order(session=session, worker_id=worker_id, what=order.what)
    except LookupError:
        raise HTTPException(404, f"There is no worker {worker_id}.") from None
    session.commit()
    return _out(row, workers.is_alive(row, settings.stale_after_seconds))
