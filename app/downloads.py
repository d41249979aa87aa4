"""Model downloads: the one owner of `model_downloads` rows. The web tier queues one after a lookup
(app.hub); a worker takes it from the queue like a run or an export (app.jobs' DOWNLOAD kind), fetches
the files into the Hugging Face cache and reports how far it got; the Models page shows the progress and
may cancel it.

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
                         │
                         └── cancel asked: the worker stops the transfer, keeping what arrived, so that
                             downloading again resumes where it stopped
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jobs
from app.hub import HubModel
from app.models import ModelDownload, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
SHOWN_FOR = timedelta(days=1)  # finished downloads stay listed this long (failed ones until retried)


class DownloadRefused(ValueError):
    """A download that cannot be queued, with its sentence."""


def _under_way(session: Session, model: HubModel) -> ModelDownload | None:
    """The queued or running download of the same model, revision and hub (at most one: a unique index)."""
    return session.scalar(
        select(ModelDownload).where(
            ModelDownload.repo_id == model.repo_id,
            ModelDownload.revision == model.revision,
            ModelDownload.endpoint == model.endpoint,
            ModelDownload.status.in_(ACTIVE),
        )
    )


def request(*, session: Session, model: HubModel) -> tuple[ModelDownload, bool]:
    """Queue the download of a looked-up model, or give the one already under way for the same model and
    revision. Returns (download, queued now)."""
    if model.refusal:
        raise DownloadRefused(model.refusal)
    if (under_way := _under_way(session, model)) is not None:
        return under_way, False
    download = ModelDownload(
        repo_id=model.repo_id,
        revision=model.revision,
        commit=model.commit,
        endpoint=model.endpoint,
        source=model.source,
        files=model.files,
        bytes_total=model.size,
        bytes_done=0,
        status=QUEUED,
    )
    session.add(download)
    try:
        session.commit()
    except IntegrityError:  # the same download asked for twice at once: the other request queued it
        session.rollback()
        if (again := _under_way(session, model)) is None:
            raise
        return again, False
    return download, True


def listed(*, session: Session) -> list[ModelDownload]:
    """What the Models page shows: downloads under way, failed ones not downloaded since, and any that
    ended in the last day; newest first."""
    rows = session.scalars(select(ModelDownload).order_by(ModelDownload.id.desc()).limit(50)).all()
    shown, seen = [], set()
    for row in rows:
        key = (row.source, row.repo_id, row.revision)
        recent = row.finished_at is None or utcnow() - row.finished_at < SHOWN_FOR
        if key in seen or not (row.status in ACTIVE or row.status == FAILED or recent):
            continue
        seen.add(key)
        shown.append(row)
    return shown


def arriving(*, session: Session) -> dict[tuple[str, str], list[str]]:
    """The snapshots being downloaded, (the model list's id for it, commit): the files they will hold. The
    model list leaves out such a snapshot until every one of them is there (an earlier, complete one stays
    listed)."""
    from app.model_registry import fetched_model_id

    rows = session.execute(
        select(ModelDownload.source, ModelDownload.repo_id, ModelDownload.commit, ModelDownload.files).where(
            ModelDownload.status.in_(ACTIVE)
        )
    ).all()
    coming = {}
    for source, repo_id, commit, files in rows:
        coming[fetched_model_id(source, repo_id), commit] = list(files)
    return coming


def others_active(*, session: Session, download_id: int, repo_id: str) -> bool:
    """Whether another download of the same model is under way (its partly written files are its own)."""
    return (
        session.scalar(
            select(ModelDownload.id).where(
                ModelDownload.repo_id == repo_id,
                ModelDownload.id != download_id,
                ModelDownload.status.in_(ACTIVE),
            )
        )
        is not None
    )


def cancel(*, session: Session, download: ModelDownload) -> None:
    """A queued download ends at once; a running one is stopped by its worker within a heartbeat."""
    if download.status == QUEUED:
        download.status, download.finished_at = CANCELLED, utcnow()
    elif download.status == RUNNING:
        download.cancel_requested = True
    session.commit()


def retry(*, session: Session, download: ModelDownload) -> None:
    """Queue a failed or cancelled download again; the files that arrived are kept and resumed from."""
    if download.status in ACTIVE or download.status == SUCCEEDED:
        return
    jobs.forget(session=session, kind=jobs.DOWNLOAD, job_id=download.id)
    download.status, download.error, download.cancel_requested = QUEUED, None, False
    download.attempts, download.worker_id, download.speed = 0, None, None
    download.started_at = download.finished_at = None
    session.commit()


def report(*, session: Session, download_id: int, worker_id: str, done: int, speed: float | None) -> bool:
    """The worker's heartbeat with the bytes that have arrived. False: stop."""
    return jobs.transfer_beat(
        session=session, kind=jobs.DOWNLOAD, job_id=download_id, worker_id=worker_id, done=done, speed=speed
    )


def end(*, session: Session, download_id: int, worker_id: str, status: str, error: str | None = None) -> bool:
    return jobs.transfer_end(
        session=session,
        kind=jobs.DOWNLOAD,
        job_id=download_id,
        worker_id=worker_id,
        status=status,
        error=error,
    )
