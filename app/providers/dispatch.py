"""The dispatcher: Tuneboard queues and watches, the scheduler places and limits. In the web server, every
heartbeat: a queued run sent to a provider becomes one scheduler job (app.providers.slurm), whose one-shot
worker claims exactly that run through the ordinary queue (app.jobs) and trains it as a worker elsewhere
does; what the scheduler says of each job (pending and why, running on which node, ended how) goes to its
`cluster_jobs` row, which the run's page shows.

    queued run ──submit──▶ PENDING ──▶ RUNNING ──▶ the run finishes; the worker exits
                              │           │
           cancel: scancel ◀──┘           └── the job ends first (time limit, preemption, a lost node,
                                              killed): the run goes back to the queue (its worker handed
                                              it back, or it counts as lost) and a new job resumes it from
                                              the last checkpoint the web server received

A job that fails the run (its worker never took it: the node could not reach this server, say; or Slurm
says it failed: a crash, a lost node) is followed by another; after MAX_FAILED_JOBS such jobs the run fails
with the last job's log. Time limits, preemptions and cancels are interruptions, not failures. A scheduler
that does not answer leaves the runs queued, with a sentence on their page, and is asked again at the next
heartbeat.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from app import jobs
from app.config import WILDCARD_HOSTS, Settings
from app.db import PASSING_FAULTS, Database
from app.models import FINISHED, ClusterJob, JobAttempt, Run, RunStatus, utcnow
from app.providers import slurm
from app.providers.backends import Backend, backend
from app.providers.config import Provider, ProviderProblem, load, providers_file
from app.runs.folder import file_tail

log = logging.getLogger("tuneboard.providers")
MAX_FAILED_JOBS = 3  # jobs that failed the run (failed, or ended before their worker took it): it fails
EXIT_GRACE = timedelta(minutes=2)  # a finished run's worker exits by itself; after this its job is cancelled


def run_folder(settings: Settings, provider: Provider, run_id: int) -> Path:
    """Where a run's batch script and its jobs' logs are (on a filesystem the nodes share, for the logs)."""
    return settings.data_dir / "clusters" / provider.name / f"run-{run_id}"


def worker_environment(settings: Settings, provider: Provider) -> dict[str, str]:
    """The settings of a job's worker: this web server's address, the queue's database and the token."""
    host = settings.host if settings.host not in WILDCARD_HOSTS else socket.getfqdn()
    env = {
        "TUNEBOARD_SERVER_URL": provider.server_url or f"http://{host}:{settings.port}",
        "TUNEBOARD_DATABASE_URL": settings.sqlalchemy_url,
        "TUNEBOARD_GENERATION": "false",
    }
    if settings.token is not None:
        env["TUNEBOARD_TOKEN"] = settings.token.get_secret_value()
    return env


def installation(settings: Settings) -> str:
    """This installation's mark on its jobs (from its database's address), so that two servers sharing a
    cluster never take each other's jobs for their own."""
    from sqlalchemy.engine import make_url

    address = make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)  # no password in it
    return hashlib.sha256(address.encode()).hexdigest()[:8]


def job_name(settings: Settings, run_id: int, attempt: int = 1) -> str:
    """The name of a run's `attempt`th job in the scheduler."""
    return f"tuneboard-{installation(settings)}-run-{run_id}-{attempt}"


def tick(settings: Settings, db: Database, providers: dict[str, Provider]) -> None:
    """One look at every job under way, then the queued runs that need one. Runs whose worker went silent
    go back to the queue here too (a cluster may be the only place runs train)."""
    with db.write_session() as session:
        jobs.requeue_stale(session=session, stale_after=timedelta(seconds=settings.stale_after_seconds))
    with db.session() as session:
        active = session.scalars(select(ClusterJob).where(ClusterJob.ended_at.is_(None))).all()
        by_provider: dict[tuple[str, str], list[ClusterJob]] = {}
        for row in active:
            by_provider.setdefault((row.provider, row.kind), []).append(row)
    for (name, kind), rows in by_provider.items():
        # a provider no longer in the file (an edit under way, a mistake): its jobs are still watched
        # (a Slurm cluster's, with this server's own settings), never given up for lost
        asked = backend(kind, providers.get(name), installation(settings))
        if asked is None:
            log.warning("provider %s is not in the file: its jobs cannot be watched", name)
            continue
        try:
            states = asked.poll([row.job_id for row in rows])
        except slurm.SlurmError as exc:
            log.warning("provider %s: %s", name, exc)
            continue
        for row in rows:
            _follow(db, asked, row.id, states[row.job_id])
    _submit_queued(settings, db, providers)


def anything_to_watch(db: Database) -> bool:
    """Whether a job is under way or a run waits for one (the dispatcher looks, even without a file)."""
    with db.session() as session:
        waiting = select(Run.id).where(
            Run.status.in_((RunStatus.QUEUED, RunStatus.RUNNING)), Run.provider.is_not(None)
        )
        return (
            session.scalar(waiting.limit(1)) is not None
            or session.scalar(select(ClusterJob.id).where(ClusterJob.ended_at.is_(None)).limit(1)) is not None
        )


def _follow(db: Database, asked: Backend, row_id: int, now_state: slurm.JobState) -> None:
    """One job's news: record it; cancel a job its run no longer needs; send a run whose job ended
    before it finished back to the queue."""
    cancel = False
    with db.write_session() as session:
        row = session.get(ClusterJob, row_id)
        if row is None or row.ended_at is not None:
            return
        run = session.get(Run, row.run_id)
        row.state, row.reason = now_state.state, now_state.reason
        row.node = now_state.node or row.node
        if now_state.state == "RUNNING" and row.started_at is None:
            row.started_at = utcnow()
        if now_state.ended:
            row.ended_at = utcnow()
            if run is not None and run.status == RunStatus.RUNNING and run.worker_id:
                if is_jobs_worker(row.job_id, run.worker_id):
                    jobs.lose(session=session, kind=jobs.TRAIN, job_id=run.id, worker_id=run.worker_id)
                    log.info("run %d: job %s ended (%s); back to the queue", run.id, row.job_id, row.state)
        elif run is None or run.status in FINISHED:
            finished_at = run.finished_at if run is not None else None
            late = finished_at is None or utcnow() - finished_at > EXIT_GRACE
            cancel = now_state.state == "PENDING" or late
        elif run.cancel_requested and now_state.state == "PENDING":
            cancel = True
        session.commit()
        job_id = row.job_id
    if cancel:
        try:
            asked.cancel(job_id)
        except slurm.SlurmError as exc:
            log.warning("job %s could not be cancelled: %s", job_id, exc)


def is_jobs_worker(job_id: str, worker_id: str) -> bool:
    """Whether a worker is the one a scheduler job started (its name carries the job's id)."""
    return f":job-{job_id}:" in worker_id


_active_job = select(ClusterJob.id).where(ClusterJob.run_id == Run.id, ClusterJob.ended_at.is_(None))


def _submit_queued(settings: Settings, db: Database, providers: dict[str, Provider]) -> None:
    with db.session() as session:
        waiting = session.scalars(
            select(Run.id)
            .where(Run.status == RunStatus.QUEUED, Run.provider.is_not(None))
            .where(~_active_job.exists())
            .order_by(Run.id)
        ).all()
    for run_id in waiting:
        _submit(settings, db, providers, run_id)


def _fail(session, run: Run, error: str) -> None:
    run.status, run.finished_at, run.error = RunStatus.FAILED, utcnow(), error
    session.commit()


def _submit(settings: Settings, db: Database, providers: dict[str, Provider], run_id: int) -> None:
    from app.runs.state import record_phase

    with db.write_session() as session:
        run = session.get(Run, run_id)
        if run is None or run.status != RunStatus.QUEUED or run.provider is None:
            return
        provider = providers.get(run.provider)
        if provider is None:  # kept queued: the file may be being edited; the page says what to do
            where = settings.data_dir / "providers.yaml"
            said = f"Waiting: the provider {run.provider} is not in {where}; put it back, or cancel this run"
            record_phase(session=session, run_id=run_id, phase=said)
            return
        failed = failed_jobs(session, run.id)
        if len(failed) >= MAX_FAILED_JOBS:
            last = failed[-1]
            _fail(
                session,
                run,
                f"{len(failed)} jobs on {provider.name} failed without finishing this run (the last: job "
                f"{last.job_id}, {last.state}{f', {last.reason}' if last.reason else ''}). Its log says why: "
                f"{last.log}{_log_tail(last.log)}",
            )
            return
        attempt = 1 + len(run.cluster_jobs)
    folder = run_folder(settings, provider, run_id)
    name, submitted_at = job_name(settings, run_id, attempt), utcnow()
    asked = backend(provider.kind, provider, installation(settings))
    assert asked is not None
    try:
        # a job an earlier submission left (a call that timed out after the scheduler took it) is adopted
        found = asked.find(name)
        if found:
            job_id, log_at = found, None
        else:
            job_id, log_at = asked.submit(run_id, name, folder, worker_environment(settings, provider))
    except (slurm.SlurmError, ValueError) as exc:
        with db.write_session() as session:
            run = session.get(Run, run_id)
            if run is None or run.status != RunStatus.QUEUED:
                return
            if isinstance(exc, slurm.SlurmError) and exc.unreachable:
                said = (
                    f"Waiting to submit to {provider.name}: {asked.kind} did not answer ({exc}); trying again"
                )
                record_phase(session=session, run_id=run_id, phase=said)
            else:
                _fail(session, run, f"The {asked.kind} cluster {provider.name} refused the job: {exc}.")
        return
    with db.write_session() as session:
        session.add(
            ClusterJob(
                run_id=run_id,
                provider=provider.name,
                kind=provider.kind,
                job_id=job_id,
                state="PENDING",
                log=log_at,
                submitted_at=submitted_at,
            )
        )
        session.commit()
        record_phase(session=session, run_id=run_id, phase=f"Submitted to {provider.label} as job {job_id}")
    log.info("run %d: submitted to %s as job %s", run_id, provider.name, job_id)


def failed_jobs(session, run_id: int) -> list[ClusterJob]:
    """The run's ended jobs that failed it: those whose worker never took the run (a node that cannot
    reach this server or its database, a broken environment), and those Slurm says failed (the worker
    crashed, a node failed, out of memory). Ends by time limit, preemption or cancel do not count."""
    ended = session.scalars(
        select(ClusterJob)
        .where(ClusterJob.run_id == run_id, ClusterJob.ended_at.is_not(None))
        .order_by(ClusterJob.id)
    ).all()
    workers = session.scalars(
        select(JobAttempt.worker_id).where(JobAttempt.kind == jobs.TRAIN.name, JobAttempt.job_id == run_id)
    ).all()
    return [
        job
        for job in ended
        if job.state in slurm.FAILURES or not any(is_jobs_worker(job.job_id, worker) for worker in workers)
    ]


def _log_tail(path: str | None, lines: int = 5) -> str:
    tail = file_tail(Path(path), 64_000).splitlines()[-lines:] if path else []
    return ("\n" + "\n".join(tail)) if tail else ""


class Dispatcher:
    """The dispatcher's thread in the web server, while providers are configured."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings, self.db = settings, db
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="provider-dispatcher", daemon=True)

    def start(self) -> Dispatcher:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_seconds):
            try:
                if providers_file(self.settings).exists() or anything_to_watch(self.db):
                    tick(self.settings, self.db, load(self.settings))
            except ProviderProblem as exc:
                log.error("%s", exc)
            except PASSING_FAULTS as exc:
                log.warning("dispatcher: passing fault (%s)", exc)
            except Exception:  # noqa: BLE001 - the dispatcher keeps watching whatever one tick met
                log.exception("dispatcher tick failed")
