"""Server-sent event streams of runs, read from the database.

Each poll opens its own short session (never the request's). A run's stream sends its metric rows in id
order (`event: metric`, `id:` the row id, so a reconnect with Last-Event-ID resumes with no gap and no
duplicate), `event: status` whenever the run's state or progress changes, and `event: done` once the run
has finished and every row was sent. The list stream sends one `event: run` per run whose row changed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
from sqlalchemy import func, select
from sse_starlette import ServerSentEvent

from app.db import Database
from app.models import Run, RunMetric
from app.runs.state import FINISHED

POLL_SECONDS = 0.5
METRIC_FIELDS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second",
                 "step_time", "memory_mb", "gpu_memory_mb")  # fmt: skip


def metric_payload(metric: RunMetric) -> dict[str, Any]:
    payload = {"kind": metric.kind}
    payload.update({f: getattr(metric, f) for f in METRIC_FIELDS if getattr(metric, f) is not None})
    return payload


def progress(run: Run, latest: RunMetric | None = None, *, now: datetime | None = None) -> dict[str, Any]:
    """What a page shows about a run besides its curves: status, step/total, elapsed, ETA."""
    now = now or datetime.now(UTC)
    elapsed = eta = None
    if run.started_at:
        end = run.finished_at or now
        elapsed = max(0.0, (end - run.started_at).total_seconds())
    if run.status == "running" and latest is not None and latest.step_time and run.total_steps:
        eta = max(0.0, (run.total_steps - run.current_step) * latest.step_time)
    return {
        "id": run.id,
        "status": run.status,
        "cancel_requested": run.cancel_requested,
        "step": run.current_step,
        "total_steps": run.total_steps,
        "fraction": (run.current_step / run.total_steps) if run.total_steps else 0.0,
        "epoch": latest.epoch if latest else None,
        "loss": latest.loss if latest else None,
        "tokens_per_second": latest.tokens_per_second if latest else None,
        "elapsed_seconds": elapsed,
        "eta_seconds": eta,
        "attempts": run.attempts,
        "error": run.error,
    }


def latest_train_metric(session, run_id: int) -> RunMetric | None:
    return session.scalars(
        select(RunMetric)
        .where(RunMetric.run_id == run_id, RunMetric.kind == "train")
        .order_by(RunMetric.id.desc())
    ).first()


def _run_poll(db: Database, run_id: int, after: int) -> tuple[Run | None, list[RunMetric], RunMetric | None]:
    with db.session() as session:
        run = session.get(Run, run_id)
        if run is None:
            return None, [], None
        rows = session.scalars(
            select(RunMetric)
            .where(RunMetric.run_id == run_id, RunMetric.id > after)
            .order_by(RunMetric.id)
            .limit(500)
        ).all()
        latest = latest_train_metric(session, run_id)
        session.expunge_all()
        return run, list(rows), latest


async def run_stream(db: Database, run_id: int, after: int, *, poll: float = POLL_SECONDS) -> AsyncIterator:
    """Metric, status and done events of one run, from metric id `after` on."""
    last_status = None
    while True:
        run, rows, latest = await anyio.to_thread.run_sync(_run_poll, db, run_id, after)
        if run is None:
            yield ServerSentEvent(json.dumps({"error": f"There is no run {run_id}."}), event="done")
            return
        for row in rows:
            after = row.id
            yield ServerSentEvent(json.dumps(metric_payload(row)), event="metric", id=str(row.id))
        status = progress(run, latest)
        key = {k: v for k, v in status.items() if k not in ("elapsed_seconds", "eta_seconds")}
        if key != last_status:
            last_status = key
            yield ServerSentEvent(json.dumps(status), event="status", id=str(after) if after else None)
        if run.status in FINISHED and len(rows) < 500:
            yield ServerSentEvent(json.dumps(status), event="done", id=str(after) if after else None)
            return
        await anyio.sleep(poll)


def _list_poll(db: Database, since: datetime | None) -> list[tuple[Run, RunMetric | None]]:
    with db.session() as session:
        query = select(Run).order_by(Run.id)
        runs = session.scalars(query).all()
        changed = [
            (run, latest_train_metric(session, run.id))
            for run in runs
            if since is None
            or run.status in ("queued", "running")
            or (run.finished_at and run.finished_at >= since)
        ]
        session.expunge_all()
        return changed


async def list_stream(
    db: Database, encode: Callable[[Run, RunMetric | None], ServerSentEvent], *, poll: float = 1.0
) -> AsyncIterator:
    """One event (encoded by the caller) for each run that changed since the last poll, and `runs-changed`
    when runs were added or deleted."""
    sent: dict[int, str] = {}
    since = None
    count = None
    while True:
        started = datetime.now(UTC)
        rows = await anyio.to_thread.run_sync(_list_poll, db, since)
        total = await anyio.to_thread.run_sync(_count_runs, db)
        if count is not None and total != count:
            yield ServerSentEvent(str(total), event="runs-changed")
        count = total
        for run, latest in rows:
            event = encode(run, latest)
            if sent.get(run.id) != event.data:
                sent[run.id] = event.data
                yield event
        since = started
        await anyio.sleep(poll)


async def tracked(app, stream: AsyncIterator) -> AsyncIterator:
    """Counts the open streams (shown by /healthz), so a test can see a closed client release its stream."""
    app.state.open_streams += 1
    try:
        async for event in stream:
            yield event
    finally:
        app.state.open_streams -= 1


def _count_runs(db: Database) -> int:
    with db.session() as session:
        return session.scalar(select(func.count(Run.id)))
