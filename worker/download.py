"""Model downloads, made by a worker: `run_download` (in the worker loop) starts `python -m worker.download
ID`, keeps the worker's heartbeat, and records how the download ended; the child fetches the model's files
with the `huggingface_hub` client into the ordinary Hugging Face cache (the client's own resumable
transfers, only the files the lookup chose), reporting the bytes that have arrived, and stops when the
download is cancelled.
"""

from __future__ import annotations

import errno
import io
import logging
import sys
import threading
from pathlib import Path

from sqlalchemy import select
from tqdm.std import tqdm

from app import downloads, jobs, workers
from app.config import Settings
from app.db import Database
from app.hub import guard_tokens, hub_name, known_sentence, repo_folder, token_for
from app.model_registry import is_model_folder
from app.models import ModelDownload
from worker.child import CANCELLED, BytesReporter, Cancelled, job_child, job_tick, run_child
from worker.supervise import write_with_retry

log = logging.getLogger("tuneboard.download")
SAID = "tuneboard-download-error:"  # the child's own sentence on a failure it can explain
CHUNK = 1024 * 1024  # bytes the client reads at a time


# --- in the worker loop -----------------------------------------------------------------------------------


def run_download(
    settings: Settings, db: Database, download: ModelDownload, *, me: str, stop: threading.Event, **_
) -> None:
    """Fetch one claimed model in a child process and record how it ended. A worker stopping hands the
    download back to the queue (the next attempt resumes the files that arrived)."""
    log.info(
        "download %d: %s at %s from %s", download.id, download.repo_id, download.revision, download.endpoint
    )

    cancelled = threading.Event()
    tick = job_tick(
        db,
        me=me,
        kind=jobs.DOWNLOAD,
        job_id=download.id,
        status="downloading",
        stop=stop,
        cancelled=cancelled,
    )
    ended = run_child(
        [sys.executable, "-m", "worker.download", str(download.id), "--worker", me],
        stop=stop,
        env=settings.child_env(),
        tick=tick,
        every=1.0,
    )
    if ended.code is None and not cancelled.is_set():  # the worker is stopping
        write_with_retry(
            db, lambda s: jobs.hand_back(session=s, kind=jobs.DOWNLOAD, job_id=download.id, worker_id=me)
        )
        return
    if ended.code != 0:
        with db.session() as session:
            alone = not downloads.others_active(
                session=session, download_id=download.id, repo_id=download.repo_id
            )
        if alone:
            drop_partial_files(download.repo_id)
    if ended.code == 0:
        status, error = downloads.SUCCEEDED, None
    elif ended.code == CANCELLED or cancelled.is_set():
        status, error = downloads.CANCELLED, None
    else:
        status, error = downloads.FAILED, ended.reason(SAID)
    write_with_retry(
        db,
        lambda s: downloads.end(session=s, download_id=download.id, worker_id=me, status=status, error=error),
    )
    log.info("download %d %s%s", download.id, status, f": {error}" if error else "")


def drop_partial_files(repo_id: str) -> None:
    """The partly written files a stopped transfer leaves in the cache (the client starts a file it did not
    finish again from its beginning in a later call, under another name); files that arrived whole stay,
    and the next download fetches only the others."""
    blobs = repo_folder(repo_id) / "blobs"
    for partial in blobs.glob("*.incomplete"):
        partial.unlink(missing_ok=True)


# --- in the child -----------------------------------------------------------------------------------------


class FileUnusable(Exception):
    """The transfer ended, but what arrived is not the model the lookup described."""


def reporter(db: Database, download_id: int, worker_id: str, already: int = 0) -> BytesReporter:
    """Bytes that have arrived, to the download's row."""

    def send(session, done: int, speed: float | None) -> bool:
        return downloads.report(
            session=session, download_id=download_id, worker_id=worker_id, done=done, speed=speed
        )

    return BytesReporter(db, send, already)


def progress_class(report: BytesReporter) -> type[tqdm]:
    """A tqdm class for the client: its bar of bytes written (resumed bytes included) goes to `report`;
    nothing is printed."""

    class Progress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"], kwargs["disable"] = io.StringIO(), False
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.unit == "B" and str(self.desc).startswith("Reconstruct"):
                report(int(self.n))
            return shown

    return Progress


def fetch(settings: Settings, db: Database, download_id: int, worker_id: str) -> Path:
    """Download the model's chosen files into the Hugging Face cache; the snapshot folder."""
    from huggingface_hub import constants, snapshot_download

    constants.DOWNLOAD_CHUNK_SIZE = CHUNK  # progress and a cancel every MiB, not every 10 MiB

    with db.session() as session:
        row = session.get(ModelDownload, download_id)
        if row is None:
            raise Cancelled
        repo_id, revision, commit = row.repo_id, row.revision, row.commit
        url, row_files = row.endpoint, dict(row.files)
    guard_tokens(url)
    files = list(row_files)
    # files an earlier attempt brought whole: the client skips them, and its bars never count them
    snapshot = repo_folder(repo_id) / "snapshots" / commit
    here = sum(size for name, size in row_files.items() if (snapshot / name).is_file())
    report = reporter(db, download_id, worker_id, already=here)
    report(0, force=True)
    folder = Path(
        snapshot_download(
            repo_id,
            revision=commit,  # the commit the lookup described, though the branch may have moved since
            allow_patterns=files,
            endpoint=url,
            token=token_for(settings, url),
            tqdm_class=progress_class(report),
        )
    )
    if revision != commit:  # the cache's ref, as a download by the revision's name writes it
        refs = folder.parent.parent / "refs" / revision
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(commit, encoding="utf-8")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing or not is_model_folder(folder):
        raise FileUnusable(
            f"{hub_name(url)} sent {repo_id} without {', '.join(missing[:5]) or 'a complete model'}; "
            "download it again."
        )
    report.already = 0
    report(sum((folder / name).stat().st_size for name in files), force=True)
    return folder


# --- a worker without the web server's disk, fetching a run's base model for itself -------------------------


def snapshot_commit(model_path: str) -> str | None:
    """The commit of the web server's copy of a model fetched by name (its folder in the Hugging Face cache
    is …/snapshots/<commit>), so that every worker trains the same weights; None for other folders."""
    folder = Path(model_path)
    return folder.name if folder.parent.name == "snapshots" else None


def fetch_for_run(
    settings: Settings,
    db: Database,
    run_id: int,
    repo_id: str,
    model_path: str,
    *,
    me: str,
    stop: threading.Event,
) -> tuple[str | None, Path | None]:
    """Fetch a run's base model, named owner/name, from the hub this worker reaches (HF_ENDPOINT) into its
    own Hugging Face cache, at the commit the web server holds; the run's page says how far it got and the
    Workers page that this worker is downloading. Returns why it could not, or the model's folder. A cancel
    of the run, or the worker stopping, ends the transfer (the files that arrived stay for the next try)."""
    from huggingface_hub import snapshot_download

    from app import hub
    from app.models import Run
    from app.runs import state

    commit = snapshot_commit(model_path)
    try:
        found = hub.lookup(settings, repo_id, commit)
    except hub.HubProblem as exc:
        return f"This worker could not fetch {repo_id}: {exc}", None
    if found.refusal:
        return f"This worker could not fetch {repo_id}: {found.refusal}", None
    where = hub.hub_name(found.endpoint)

    def send(session, done: int, speed: float | None) -> bool:
        from app.units import filesize

        workers.beat(session=session, worker_id=me, status="downloading", run_id=run_id)
        phase = f"Fetching {repo_id} from {where} to this worker: {filesize(done)} of {filesize(found.size)}"
        state.record_phase(session=session, run_id=run_id, phase=phase)
        cancelled = session.scalar(select(Run.cancel_requested).where(Run.id == run_id))
        return not (cancelled or stop.is_set())

    report = BytesReporter(db, send)
    log.info("run %d: fetching %s at %s from %s", run_id, repo_id, found.commit, found.endpoint)
    try:
        report(0, force=True)
        folder = Path(
            snapshot_download(
                repo_id,
                revision=found.commit,
                allow_patterns=list(found.files),
                endpoint=found.endpoint,
                # a worker's own token for its hub, else the one its operator set (HF_TOKEN)
                token=token_for(settings, found.endpoint) or None,
                tqdm_class=progress_class(report),
            )
        )
    except Cancelled:
        drop_partial_files(repo_id)
        return f"The transfer of {repo_id} to this worker was stopped.", None
    except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
        drop_partial_files(repo_id)
        return (
            f"This worker could not fetch {repo_id}: {sentence(exc, found.endpoint, repo_id, found.commit)}",
            None,
        )
    if not is_model_folder(folder):
        return f"{where} sent {repo_id} to this worker without a complete model; launch the run again.", None
    return None, folder


def sentence(exc: BaseException, url: str, repo_id: str, revision: str) -> str:
    """The sentence for a failed download: the lookup's sentences, a full disk, or a broken transfer."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "The disk holding the Hugging Face cache is full. Free some space, then download it again."
    if isinstance(exc, FileUnusable):
        return str(exc)
    return known_sentence(exc, url, repo_id=repo_id, revision=revision) or (
        f"The transfer of {repo_id} from {hub_name(url)} broke off ({type(exc).__name__}: {exc}). Download "
        "it again: it resumes from the files that arrived."
    )


def main(argv: list[str] | None = None) -> int:
    def failed(exc: BaseException, row: ModelDownload | None) -> str:
        return sentence(exc, row.endpoint, row.repo_id, row.revision) if row else str(exc)

    def work(settings: Settings, db: Database, download_id: int, worker_id: str) -> None:
        fetch(settings, db, download_id, worker_id)

    return job_child(argv, what="download", table=ModelDownload, work=work, sentence=failed, said=SAID)


if __name__ == "__main__":
    sys.exit(main())
