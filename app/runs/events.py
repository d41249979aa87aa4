"""Server-sent event streams of runs, read from the database and shared between viewers.

A run's stream sends its metric rows in id order (`event: metric`, `id:` the row id, so a reconnect with
Last-Event-ID resumes with no gap and no duplicate), `event: status` whenever the run's state or progress
changes, and `event: done` once the run has finished and every row was sent. The list stream sends one
event per run whose row changed.

However many browsers watch, the database is polled once per interval per run (a `RunFeed`) and once for
the list (a `ListFeed`); each poll opens its own short session. Open streams wait on the feed's condition
and cost nothing until something changes. A stream first reads the history it missed with its own session,
then follows the feed. Feeds hold recent rows only; nothing here is job state: the database stays the
source of truth, and a feed with no viewer stops polling.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
from sqlalchemy import func, select
from sse_starlette import ServerSentEvent

from app.db import Database
from app.models import FINISHED, Run, RunMetric, RunStatus

POLL_SECONDS = 0.5
LIST_POLL_SECONDS = 1.0
BATCH = 500  # rows read per query
BUFFER = 5000  # recent rows a feed keeps for late viewers


def metric_payload(metric: RunMetric) -> dict[str, Any]:
    """A logged point as the API and the pages' streams send it: kind, step and every value it carries."""
    return {"kind": metric.kind, "step": metric.step, **metric.values}


def progress(run: Run, latest: RunMetric | None = None, *, now: datetime | None = None) -> dict[str, Any]:
    """What a page shows about a run besides its curves: status, step/total, elapsed, ETA."""
    now = now or datetime.now(UTC)
    elapsed = eta = None
    if run.started_at:
        end = run.finished_at or now
        elapsed = max(0.0, (end - run.started_at).total_seconds())
    step_time = latest.get("step_time") if latest else None
    logged_eta = latest.get("eta_seconds") if latest else None
    if run.status == RunStatus.RUNNING and latest is not None and logged_eta is not None:
        # the training process's own: steps to go and the evaluations still to come, as of its last log
        since = max(0.0, (now - latest.created_at).total_seconds()) if latest.created_at else 0.0
        eta = max(0.0, logged_eta - since)
    elif run.status == RunStatus.RUNNING and step_time and run.total_steps:
        eta = max(0.0, (run.total_steps - run.current_step) * step_time)
    return {
        "id": run.id,
        "status": run.status,
        "cancel_requested": run.cancel_requested,
        "step": run.current_step,
        "total_steps": run.total_steps,
        "fraction": (run.current_step / run.total_steps) if run.total_steps else 0.0,
        "epoch": latest.get("epoch") if latest else None,
        "loss": latest.get("loss") if latest else None,
        "tokens_per_second": latest.get("tokens_per_second") if latest else None,
        "elapsed_seconds": elapsed,
        "eta_seconds": eta,
        "attempts": run.attempts,
        "error": run.error,
        "phase": run.phase if run.status == RunStatus.RUNNING else None,
    }


def _changes(status: dict) -> dict:
    """The part of a progress dict whose change is worth an event (time passing is not)."""
    return {k: v for k, v in status.items() if k not in ("elapsed_seconds", "eta_seconds")}


def latest_train_metric(session, run_id: int) -> RunMetric | None:
    return session.scalars(
        select(RunMetric)
        .where(RunMetric.run_id == run_id, RunMetric.kind == "train")
        .order_by(RunMetric.id.desc())
    ).first()


def _read_run(db: Database, run_id: int, after: int) -> tuple[Run | None, list[RunMetric], RunMetric | None]:
    """One short session: the run, up to BATCH metric rows after `after`, and the latest train row."""
    with db.session() as session:
        run = session.get(Run, run_id)
        if run is None:
            return None, [], None
        rows = session.scalars(
            select(RunMetric)
            .where(RunMetric.run_id == run_id, RunMetric.id > after)
            .order_by(RunMetric.id)
            .limit(BATCH)
        ).all()
        latest = latest_train_metric(session, run_id)
        session.expunge_all()
        return run, list(rows), latest


class Feed:
    """Polls while someone listens; wakes every listener when its poll saw a change."""

    interval = POLL_SECONDS

    def __init__(self, db: Database, tasks: set[asyncio.Task]):
        self.db = db
        self.tasks = tasks  # every polling task of the process's feeds, so that shutdown can stop them
        self.version = 0
        self.listeners = 0
        self.ended = False
        self.condition = asyncio.Condition()
        self.task: asyncio.Task | None = None

    async def poll(self) -> bool:
        """Read the database once; True when something changed."""
        raise NotImplementedError

    async def _loop(self) -> None:
        while self.listeners > 0 and not self.ended:
            if await self.poll():
                async with self.condition:
                    self.version += 1
                    self.condition.notify_all()
            await asyncio.sleep(self.interval)
        async with self.condition:
            self.condition.notify_all()

    def join(self) -> None:
        self.listeners += 1
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
            self.tasks.add(self.task)
            self.task.add_done_callback(self.tasks.discard)

    def leave(self) -> None:
        self.listeners -= 1

    async def wait(self, seen: int) -> int:
        """Until the version passes `seen` (or the feed ends); returns the new version."""
        async with self.condition:
            await self.condition.wait_for(
                lambda: self.version > seen or self.ended or self.task is None or self.task.done()
            )
            return self.version


class RunFeed(Feed):
    def __init__(self, db: Database, tasks: set[asyncio.Task], run_id: int, start_after: int):
        super().__init__(db, tasks)
        self.run_id = run_id
        self.floor = self.max_id = start_after  # the buffer holds every row of this run after `floor`
        self.rows: list[tuple[int, dict]] = []
        self.status: dict | None = None
        self.missing = False

    async def poll(self) -> bool:
        run, rows, latest = await anyio.to_thread.run_sync(_read_run, self.db, self.run_id, self.max_id)
        if run is None:
            self.missing = self.ended = True
            return True
        changed = bool(rows)
        if rows:
            self.rows.extend((row.id, metric_payload(row)) for row in rows)
            self.max_id = rows[-1].id
            if len(self.rows) > BUFFER:
                self.floor = self.rows[-BUFFER - 1][0]
                del self.rows[:-BUFFER]
        status = progress(run, latest)
        if self.status is None or _changes(status) != _changes(self.status):
            changed = True
        self.status = status
        if run.status in FINISHED and len(rows) < BATCH:
            self.ended = changed = True
        return changed

    def rows_after(self, last: int) -> list[tuple[int, dict]] | None:
        """Buffered rows after `last`, or None when `last` is older than the buffer."""
        if last < self.floor:
            return None
        return [(i, p) for i, p in self.rows if i > last]


def _last_metric_id(db: Database, run_id: int) -> int:
    with db.session() as session:
        return session.scalar(select(func.max(RunMetric.id)).where(RunMetric.run_id == run_id)) or 0


class Feeds:
    """The web process's feeds, one per watched run and one for the list."""

    def __init__(self, db: Database):
        self.db = db
        self.runs: dict[int, RunFeed] = {}
        self.list: ListFeed | None = None
        self.tasks: set[asyncio.Task] = set()

    async def run(self, run_id: int) -> RunFeed:
        feed = self.runs.get(run_id)
        if feed is None:
            start = await anyio.to_thread.run_sync(_last_metric_id, self.db, run_id)
            feed = self.runs.setdefault(
                run_id, RunFeed(self.db, self.tasks, run_id, start)
            )  # another viewer may have won
        return feed

    def release(self, feed: RunFeed) -> None:
        """Forget a feed nobody watches, so finished runs' rows do not stay in memory."""
        if feed.listeners == 0 and self.runs.get(feed.run_id) is feed:
            del self.runs[feed.run_id]

    async def close(self) -> None:
        """Stop every feed's polling and wait for a read in flight to finish, before the engine goes."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def runs_list(self) -> ListFeed:
        if self.list is None or (
            self.list.listeners == 0 and (self.list.task is None or self.list.task.done())
        ):
            self.list = ListFeed(self.db, self.tasks)
        return self.list


RunEvent = tuple[Literal["metric", "status", "done"], dict[str, Any], int]  # (kind, payload, last metric id)


async def run_events(feeds: Feeds, run_id: int, after: int) -> AsyncIterator[RunEvent]:
    """Metric, status and done events of one run, from metric id `after` on. A run that does not exist
    gets one `done` with an `error`."""
    feed = await feeds.run(run_id)
    feed.join()  # before reading the history: rows committed meanwhile are then in the feed
    try:
        last, sent_status = after, None
        while True:  # the history this viewer missed, read with its own session
            run, rows, latest = await anyio.to_thread.run_sync(_read_run, feeds.db, run_id, last)
            if run is None:
                yield "done", {"error": f"There is no run {run_id}."}, last
                return
            for row in rows:
                last = row.id
                yield "metric", metric_payload(row), last
            if len(rows) < BATCH:
                break
        status = progress(run, latest)
        yield "status", status, last
        sent_status = _changes(status)
        if run.status in FINISHED:
            yield "done", status, last
            return
        version = 0
        while True:
            version = await feed.wait(version)
            buffered = feed.rows_after(last)
            if buffered is None:  # fell behind the buffer: catch up from the database
                _, rows, _ = await anyio.to_thread.run_sync(_read_run, feeds.db, run_id, last)
                buffered = [(r.id, metric_payload(r)) for r in rows]
            for row_id, payload in buffered:
                last = row_id
                yield "metric", payload, last
            if feed.status is not None and _changes(feed.status) != sent_status:
                sent_status = _changes(feed.status)
                yield "status", feed.status, last
            finished = feed.status is not None and feed.status["status"] in FINISHED
            if feed.missing or (feed.ended and finished and feed.rows_after(last) == []):
                yield "done", feed.status or {}, last
                return
    finally:
        feed.leave()
        feeds.release(feed)


async def run_stream(feeds: Feeds, run_id: int, after: int) -> AsyncIterator[ServerSentEvent]:
    """`run_events` as the API's server-sent events: JSON data, the metric id as the event id."""
    async for kind, payload, last in run_events(feeds, run_id, after):
        event_id = str(last) if kind == "metric" or last else None
        yield ServerSentEvent(json.dumps(payload), event=kind, id=event_id)


def _read_list(db: Database) -> list[tuple[Run, RunMetric | None]]:
    with db.session() as session:
        runs = session.scalars(select(Run).order_by(Run.id)).all()
        result = [(run, latest_train_metric(session, run.id)) for run in runs]
        session.expunge_all()
        return result


class ListFeed(Feed):
    interval = LIST_POLL_SECONDS

    def __init__(self, db: Database, tasks: set[asyncio.Task]):
        super().__init__(db, tasks)
        self.runs: list[tuple[Run, RunMetric | None]] = []
        self.keys: dict[int, dict] = {}

    async def poll(self) -> bool:
        runs = await anyio.to_thread.run_sync(_read_list, self.db)
        keys = {run.id: _changes(progress(run, latest)) for run, latest in runs}
        changed = keys != self.keys
        self.runs, self.keys = runs, keys
        return changed


async def list_stream(
    feeds: Feeds, encode: Callable[[Run, RunMetric | None], ServerSentEvent], known: int | None = None
) -> AsyncIterator[ServerSentEvent]:
    """One event (encoded by the caller) for each run that changed, and `runs-changed` (the new count)
    when runs were added or deleted. `known` is how many runs the client already shows: a run created
    between rendering its page and connecting is announced at once, not missed."""
    feed = feeds.runs_list()
    feed.join()
    try:
        sent: dict[int, dict | None] = {}
        count = known
        version = 0
        while True:
            if version == 0 and not feed.keys:
                version = await feed.wait(0)
            if count is not None and len(feed.keys) != count:
                yield ServerSentEvent(str(len(feed.keys)), event="runs-changed")
            count = len(feed.keys)
            for run, latest in feed.runs:
                if sent.get(run.id) != feed.keys.get(run.id):
                    sent[run.id] = feed.keys.get(run.id)
                    yield encode(run, latest)
            version = await feed.wait(version)
    finally:
        feed.leave()


async def tracked(app, stream: AsyncIterator) -> AsyncIterator:
    """Counts the open streams (shown by /healthz), so a test can see a closed client release its stream."""
    app.state.open_streams += 1
    try:
        async for event in stream:
            yield event
    finally:
        app.state.open_streams -= 1
