"""The worker loop: wait for the database schema, then prepare base models, requeue the jobs whose worker
went silent, claim the next job this worker can serve (app.jobs: an export first, they are short and
someone is waiting for them, else a run) and hand it to its kind's handler; until SIGTERM or SIGINT. A
passing fault (database busy, a vanished file) is logged and retried with backoff, never fatal. Beside the
loop, the generation host (worker.gen_server) runs as a child process, restarted with backoff if it dies."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select

from app import jobs, workers
from app.config import Settings
from app.db import PASSING_FAULTS, Database
from app.hub import guard_tokens
from app.migrate import schema_ready
from app.model_registry import list_models
from app.models import Run, RunStatus
from app.processes import Backoff, ChildKeeper
from worker.child import beating
from worker.download import run_download
from worker.export import run_export
from worker.hardware import machine_summary
from worker.prepare import prepare_pending_models
from worker.probe import known_speeds, measure_when_idle
from worker.publish import run_publish
from worker.remote import Server
from worker.supervise import supervise

log = logging.getLogger("tuneboard.worker")


def run_worker(
    settings: Settings, *, stop: threading.Event | None = None, only_run: int | None = None
) -> int:
    """The worker until it is told to stop (a signal, or the Workers page); its exit code. `only_run`: a
    scheduler job's one-shot worker (app.providers), which trains exactly that run, then exits (1 when it
    could not: its job then ends as failed, which the dispatcher counts)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.generation:
        settings.check_exposure(settings.generation_listen[0], "the generation host")
    settings.ensure_dirs()
    guard_tokens()  # a token a worker holds goes to its hub, never elsewhere
    db = Database(settings.sqlalchemy_url)
    # a scheduler job's worker is named after its job: a Kubernetes Job's name (TUNEBOARD_JOB, set in its
    # manifest), or Slurm's job id
    job = os.environ.get("TUNEBOARD_JOB") or os.environ.get("SLURM_JOB_ID")
    me = workers.worker_id(job=job if only_run is not None else None)
    server = Server(settings, me) if settings.server_url else None
    log.info(
        "worker %s started; data in %s%s",
        me,
        settings.data_dir,
        f"; runs' files to and from {settings.server_url}" if server else " (shared with the web server)",
    )
    host = None
    try:
        # a scheduler job's worker does not hold its allocation forever for a database it cannot open
        if not wait_for_schema(settings, db, stop, within=SCHEMA_WAIT if only_run is not None else None):
            return 0 if stop.is_set() else 1
        with db.write_session() as session:  # a new process under an old name (a container's pid 1)
            workers.started(session=session, worker_id=me)
        if only_run is not None:
            return one_run(settings, db, only_run, me=me, stop=stop, server=server)
        if settings.generation:
            log.info("generation host starting on %s", settings.generation_base_url)
            host = ChildKeeper(
                "the generation host", [sys.executable, "-m", "worker.gen_server"], settings.child_env()
            )
        backoff = Backoff(first=settings.heartbeat_seconds)
        while not stop.is_set():
            try:
                did = work_once(settings, db, me=me, stop=stop, server=server)
            except PASSING_FAULTS as exc:
                delay = backoff.next()
                log.warning("passing fault (%s); trying again in %.0f s", _short(exc), delay)
                _note_fault(db, me, exc)
                stop.wait(delay)
                continue
            backoff.reset()
            if not did:
                stop.wait(settings.heartbeat_seconds)
    finally:
        if host is not None:
            host.close(grace=10)
        _say_stopped(db, me)
        db.dispose()
        if server is not None:
            server.close()
        log.info("worker stopped")
    return 0


ONE_RUN_WAIT = 60.0  # seconds a one-shot worker waits for its run to be free (its last job's worker gone)
SCHEMA_WAIT = 300.0  # seconds it waits for the database and its schema


def one_run(
    settings: Settings, db: Database, run_id: int, *, me: str, stop: threading.Event, server: Server | None
) -> int:
    """A scheduler job's worker: claim run `run_id` (queued for it by the dispatcher), train it as any
    worker does; the exit code: 0 when it finished or was handed back (told to stop), 1 when it failed or
    could not be trained here. A run that is no longer queued (cancelled meanwhile) is left alone."""
    from app.runs.state import TransitionError
    from worker.remote import ServerError

    deadline = time.monotonic() + ONE_RUN_WAIT
    while not stop.is_set():
        with db.write_session() as session:
            run = jobs.claim(session=session, kind=jobs.TRAIN, worker_id=me, only=run_id)
            status = session.scalar(select(Run.status).where(Run.id == run_id)) if run is None else None
        if run is not None:
            break
        if status not in (RunStatus.QUEUED, RunStatus.RUNNING):
            log.info("run %d is %s: nothing for this job to do", run_id, status or "gone")
            return 0
        if time.monotonic() > deadline:
            log.error("run %d is still held by another worker: this job cannot take it", run_id)
            return 1
        stop.wait(settings.heartbeat_seconds)
    else:
        return 0
    try:
        outcome = supervise(settings, db, run, me=me, stop=stop, server=server)
    except (TransitionError, ServerError) as exc:  # taken from it, or the web server out of reach
        log.error("run %d: %s; this job's worker exits", run_id, exc)
        return 1
    log.info("run %d: %s; this job's worker exits", run_id, outcome)
    return 0 if outcome in (RunStatus.SUCCEEDED, RunStatus.CANCELLED, "requeued") else 1


def wait_for_schema(
    settings: Settings, db: Database, stop: threading.Event, within: float | None = None
) -> bool:
    """Wait until the database has Tuneboard's newest schema (a worker may start before the web server
    that migrates it). Says so once. Returns False when told to stop first, or after `within` seconds."""
    said, deadline = False, time.monotonic() + within if within is not None else None
    while not stop.is_set():
        if deadline is not None and time.monotonic() > deadline:
            log.error("the database (or its newest schema) was not there within %.0f s", within)
            return False
        try:
            if schema_ready(db.engine, settings):
                return True
        except PASSING_FAULTS:
            pass  # the database file or server is not there yet either
        if not said:
            log.info(
                "waiting for the database schema: start `tuneboard web` (it applies it) "
                "or run `tuneboard migrate`"
            )
            said = True
        stop.wait(settings.heartbeat_seconds)
    return False


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _note_fault(db: Database, me: str, exc: BaseException) -> None:
    """Show the fault on the Workers page, if the database lets us."""
    try:
        with db.write_session() as session:
            workers.beat(session=session, worker_id=me, status="idle", error=_short(exc))
    except PASSING_FAULTS:
        pass


def _say_stopped(db: Database, me: str) -> None:
    try:
        with db.write_session() as session:
            workers.stopped(session=session, worker_id=me)
    except PASSING_FAULTS:
        pass  # the row goes stale and the pages call the worker gone


def capabilities(settings: Settings, db: Database, *, remote: bool = False) -> workers.Capabilities:
    """What this worker announces: its machine (with its measured speeds, worker.probe), and the base
    models it can load (ready here, or a GGUF file it can convert first); a worker without the web server's
    disk (`remote`) also fetches a model named owner/name from its hub when it lacks it, unless it is offline
    (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    with db.session() as session:
        models = [m.id for m in list_models(settings, session=session) if m.status in ("ready", "preparing")]
    if remote and not constants.HF_HUB_OFFLINE:
        models.append(workers.FETCHES)
    hardware = machine_summary()
    hardware["speed"] = known_speeds(settings, hardware)  # by base model: New run's duration before any run
    return workers.Capabilities(hardware=hardware, models=models)


def work_once(
    settings: Settings, db: Database, *, me: str, stop: threading.Event, server: Server | None = None
) -> bool:
    """One pass of the loop. Returns whether it did something (then it looks again at once)."""
    has = capabilities(settings, db, remote=server is not None)
    with db.write_session() as session:
        orders = workers.beat(session=session, worker_id=me, status="idle", capabilities=has)
    if orders.stop:
        log.info("stopping: asked to from the Workers page")
        stop.set()
        return False
    if settings.prepare_models:

        def beat() -> None:  # a conversion takes a minute or more: the worker stays visibly alive
            try:
                with db.write_session() as session:
                    workers.beat(session=session, worker_id=me, status="preparing")
            except PASSING_FAULTS:
                pass  # a busy database: the next beat tries again

        with beating(beat, settings.heartbeat_seconds, name="worker-heartbeat"):
            prepare_pending_models(settings, db, stop=stop)
    with db.write_session() as session:
        stale_after = timedelta(seconds=settings.stale_after_seconds)
        stale = jobs.requeue_stale(session=session, stale_after=stale_after)
    if stale:
        log.warning("jobs whose worker stopped responding, by kind: %s", stale)
    if stop.is_set() or orders.drain:
        return False
    with db.write_session() as session:
        claimed = jobs.claim_next(
            session=session, worker_id=me, models=has.models, gpus=has.gpus, shared_disk=server is None
        )
    if claimed is None:  # idle: a good time to learn this machine's speed, once
        return settings.prepare_models and measure_when_idle(
            settings,
            db,
            me=me,
            hardware=has.hardware,
            models=has.models,
            stop=stop,
            shared_disk=server is None,
        )
    kind, row = claimed
    HANDLERS[kind.name](settings, db, row, me=me, stop=stop, server=server)
    return True


# what a worker does with each kind of job (app.jobs.KINDS): a new kind is one handler here
HANDLERS: dict[str, Callable[..., object]] = {
    jobs.EXPORT.name: run_export,
    jobs.DOWNLOAD.name: run_download,
    jobs.PUBLISH.name: run_publish,
    jobs.TRAIN.name: supervise,
}
