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

A job that ends before its worker took the run (the node could not reach this server, say) is retried;
after MAX_IDLE_JOBS such jobs the run fails with the job's log. A scheduler that does not answer leaves
the runs queued, with a sentence on their page, and is asked again at the next heartbeat.
"""

from __future__ import annotations

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
from app.providers.config import Provider, ProviderProblem, load

log = logging.getLogger("tuneboard.providers")
MAX_IDLE_JOBS = 3  # jobs that ended before their worker took the run, before the run fails
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


def tick(settings: Settings, db: Database, providers: dict[str, Provider]) -> None:
    """One look at every job under way, then the queued runs that need one."""
    with db.session() as session:
        active = session.scalars(select(ClusterJob).where(ClusterJob.ended_at.is_(None))).all()
        by_provider: dict[str, list[ClusterJob]] = {}
        for row in active:
            by_provider.setdefault(row.provider, []).append(row)
    for name, rows in by_provider.items():
        provider = providers.get(name)
        ids = [row.job_id for row in rows]
        try:
            states = slurm.poll(ids, env=_env(provider)) if provider else {i: _unknown() for i in ids}
        except slurm.SlurmError as exc:
            log.warning("provider %s: %s", name, exc)
            continue
        for row in rows:
            _follow(settings, db, provider, row.id, states[row.job_id])
    _submit_queued(settings, db, providers)


def _unknown() -> slurm.JobState:
    return slurm.JobState("GONE", "its provider is no longer configured", None)


def _env(provider: Provider | None) -> dict[str, str]:
    return slurm.job_environment(provider, {}) if provider else {}


def _follow(
    settings: Settings, db: Database, provider: Provider | None, row_id: int, now_state: slurm.JobState
) -> None:
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
                if _worker_of(session, row, run.worker_id):
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
    if cancel and provider is not None:
        try:
            slurm.cancel(job_id, env=_env(provider))
        except slurm.SlurmError as exc:
            log.warning("job %s could not be cancelled: %s", job_id, exc)


def _worker_of(session, row: ClusterJob, worker_id: str) -> bool:
    """Whether the run's worker is this job's: it took the run after the job was submitted."""
    attempt = session.scalar(
        select(JobAttempt)
        .where(JobAttempt.kind == jobs.TRAIN.name, JobAttempt.job_id == row.run_id)
        .order_by(JobAttempt.attempt.desc())
        .limit(1)
    )
    return attempt is not None and attempt.worker_id == worker_id and attempt.started_at >= row.submitted_at


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
        if provider is None:
            where = settings.data_dir / "providers.yaml"
            _fail(session, run, f"The provider {run.provider} is no longer configured ({where}).")
            return
        idle = _idle_jobs(session, run.id)
        if len(idle) >= MAX_IDLE_JOBS:
            last = idle[-1]
            _fail(
                session,
                run,
                f"{len(idle)} jobs on {provider.name} ended before their worker took the run (the last: "
                f"job {last.job_id}, {last.state}). Its log says why: {last.log}" + _log_tail(last.log),
            )
            return
    folder = run_folder(settings, provider, run_id)
    text = slurm.script(provider, run_id, folder)
    env = slurm.job_environment(provider, worker_environment(settings, provider))
    try:
        job_id = slurm.submit(text, folder, env)
    except slurm.SlurmError as exc:
        with db.write_session() as session:
            run = session.get(Run, run_id)
            if run is None or run.status != RunStatus.QUEUED:
                return
            if exc.unreachable:
                record_phase(
                    session=session,
                    run_id=run_id,
                    phase=f"Waiting to submit to {provider.name}: Slurm did not answer ({exc}); trying again",
                )
            else:
                _fail(session, run, f"The Slurm cluster {provider.name} refused the job: {exc}.")
        return
    with db.write_session() as session:
        session.add(
            ClusterJob(
                run_id=run_id,
                provider=provider.name,
                job_id=job_id,
                state="PENDING",
                log=str(folder / f"run-{run_id}-{job_id}.out"),
                submitted_at=utcnow(),
            )
        )
        session.commit()
        record_phase(session=session, run_id=run_id, phase=f"Submitted to {provider.label} as job {job_id}")
    log.info("run %d: submitted to %s as job %s", run_id, provider.name, job_id)


def _idle_jobs(session, run_id: int) -> list[ClusterJob]:
    """The run's ended jobs whose worker never took it."""
    ended = session.scalars(
        select(ClusterJob)
        .where(ClusterJob.run_id == run_id, ClusterJob.ended_at.is_not(None))
        .order_by(ClusterJob.id)
    ).all()
    starts = session.scalars(
        select(JobAttempt.started_at).where(JobAttempt.kind == jobs.TRAIN.name, JobAttempt.job_id == run_id)
    ).all()
    return [
        job
        for job in ended
        if not any(job.submitted_at <= start <= (job.ended_at or start) for start in starts)
    ]


def _log_tail(path: str | None, lines: int = 5) -> str:
    if not path:
        return ""
    try:
        tail = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
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
                tick(self.settings, self.db, load(self.settings))
            except ProviderProblem as exc:
                log.error("%s", exc)
            except PASSING_FAULTS as exc:
                log.warning("dispatcher: passing fault (%s)", exc)
            except Exception:  # noqa: BLE001 - the dispatcher keeps watching whatever one tick met
                log.exception("dispatcher tick failed")
