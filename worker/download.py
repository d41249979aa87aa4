"""Model downloads, made by a worker: `run_download` (in the worker loop) starts `python -m worker.download
ID`, keeps the worker's heartbeat, and records how the download ended; the child fetches the model's files
with the `huggingface_hub` client into the ordinary Hugging Face cache, or with ModelScope's client into
its cache (each client's own resumable transfers, only the files the lookup chose), reporting the bytes
that have arrived, and stops when the download is cancelled.
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

from app import downloads, jobs, modelscope, workers
from app.config import Settings
from app.db import Database
from app.hub import MODELSCOPE, capital, guard_tokens, known_sentence, repo_folder, site_name, token_for
from app.model_registry import MODELSCOPE_PREFIX, is_model_folder
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
            drop_partial_files(download.source, download.repo_id)
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


def drop_partial_files(source: str, repo_id: str) -> None:
    """The partly written files a stopped transfer leaves in the Hugging Face cache (the client starts a
    file it did not finish again from its beginning in a later call, under another name); files that
    arrived whole stay, and the next download fetches only the others. ModelScope's client resumes its
    partial files: they stay."""
    if source == MODELSCOPE:
        return
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
    """Download the model's chosen files into the Hugging Face cache or ModelScope's; the snapshot
    folder."""
    with db.session() as session:
        row = session.get(ModelDownload, download_id)
        if row is None:
            raise Cancelled
        repo_id, revision, commit = row.repo_id, row.revision, row.commit
        url, row_files, source = row.endpoint, dict(row.files), row.source
    files = list(row_files)
    # files an earlier attempt brought whole: the client skips them, and its bars never count them
    if source == MODELSCOPE:
        snapshot = modelscope.snapshot_folder(repo_id, commit)
    else:
        snapshot = repo_folder(repo_id) / "snapshots" / commit
    here = sum(size for name, size in row_files.items() if (snapshot / name).is_file())
    report = reporter(db, download_id, worker_id, already=here)
    report(0, force=True)
    folder = transfer(source, url, repo_id, revision, commit, files, token_for(settings, url), report)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing or not is_model_folder(folder):
        raise FileUnusable(
            f"{capital(site_name(source, url))} sent {repo_id} without "
            f"{', '.join(missing[:5]) or 'a complete model'}; download it again."
        )
    report.already = 0
    report(sum((folder / name).stat().st_size for name in files), force=True)
    return folder


def transfer(
    source: str,
    url: str,
    repo_id: str,
    revision: str,
    commit: str,
    files: list[str],
    token: str | bool | None,
    report,
) -> Path:
    """The files from the source's hub into its cache; the snapshot folder."""
    if source == MODELSCOPE:
        return from_modelscope(url, repo_id, commit, files, token, report)
    return from_hub(url, repo_id, revision, commit, files, token, report)


def from_hub(
    url: str, repo_id: str, revision: str, commit: str, files: list[str], token: str | bool | None, report
) -> Path:
    """The files from the Hugging Face Hub (or a mirror) into its cache, at `commit`; the snapshot folder."""
    from huggingface_hub import constants, snapshot_download

    constants.DOWNLOAD_CHUNK_SIZE = CHUNK  # progress and a cancel every MiB, not every 10 MiB
    guard_tokens(url)
    folder = Path(
        snapshot_download(
            repo_id,
            revision=commit,  # the commit the lookup described, though the branch may have moved since
            allow_patterns=files,
            endpoint=url,
            token=token,
            tqdm_class=progress_class(report),
        )
    )
    if revision != commit:  # the cache's ref, as a download by the revision's name writes it
        refs = folder.parent.parent / "refs" / revision
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(commit, encoding="utf-8")
    return folder


class _Stop(BaseException):
    """A cancel, raised through ModelScope's client: it retries a file after any Exception, so the cancel
    is not one."""


def from_modelscope(
    url: str, repo_id: str, revision: str, files: list[str], token: str | bool | None, report
) -> Path:
    """The files from ModelScope into its cache, at `revision`; the snapshot folder. The client keeps a
    file it did not finish (name.incomplete) and resumes it with a range request in a later call."""
    from modelscope_hub import ProgressCallback

    lock, moved = threading.Lock(), [0]

    class Progress(ProgressCallback):  # one per file, called from the client's download threads
        def update(self, size: int) -> None:
            with lock:
                moved[0] += size
                try:
                    report(moved[0])
                except Cancelled:
                    raise _Stop from None

    try:
        folder = modelscope.api(url, token).download_repo(
            repo_id, "model", revision=revision, allow_patterns=files, progress_callbacks=[Progress]
        )
    except _Stop:
        raise Cancelled from None
    return Path(folder)


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
    model_id: str,
    model_path: str,
    *,
    me: str,
    stop: threading.Event,
) -> tuple[str | None, Path | None]:
    """Fetch a run's base model, named owner/name (or modelscope:owner/name), from the hub this worker
    reaches (HF_ENDPOINT, MODELSCOPE_ENDPOINT) into its own cache, at the commit (or revision) the web
    server holds; the run's page says how far it got and the Workers page that this worker is downloading.
    Returns why it could not, or the model's folder. A cancel of the run, or the worker stopping, ends the
    transfer (the files that arrived stay for the next try)."""
    from app import hub
    from app.models import Run
    from app.runs import state

    source = MODELSCOPE if model_id.startswith(MODELSCOPE_PREFIX) else hub.HUGGINGFACE
    repo_id = model_id.removeprefix(MODELSCOPE_PREFIX)
    try:
        found = hub.lookup(settings, repo_id, snapshot_commit(model_path), source)
    except hub.HubProblem as exc:
        return f"This worker could not fetch {repo_id}: {exc}", None
    if found.refusal:
        return f"This worker could not fetch {repo_id}: {found.refusal}", None

    def send(session, done: int, speed: float | None) -> bool:
        from app.units import filesize

        workers.beat(session=session, worker_id=me, status="downloading", run_id=run_id)
        sizes = f"{filesize(done)} of {filesize(found.size)}"
        phase = f"Fetching {repo_id} from {found.where} to this worker: {sizes}"
        state.record_phase(session=session, run_id=run_id, phase=phase)
        cancelled = session.scalar(select(Run.cancel_requested).where(Run.id == run_id))
        return not (cancelled or stop.is_set())

    report = BytesReporter(db, send)
    log.info("run %d: fetching %s at %s from %s", run_id, repo_id, found.commit, found.endpoint)
    # a worker's own token for its hub, else the one its operator set (HF_TOKEN, MODELSCOPE_API_TOKEN)
    token = token_for(settings, found.endpoint) or None
    try:
        report(0, force=True)
        commit = found.commit
        folder = transfer(source, found.endpoint, repo_id, commit, commit, list(found.files), token, report)
    except Cancelled:
        drop_partial_files(source, repo_id)
        return f"The transfer of {repo_id} to this worker was stopped.", None
    except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
        drop_partial_files(source, repo_id)
        why = sentence(exc, found.endpoint, repo_id, found.commit, source)
        return f"This worker could not fetch {repo_id}: {why}", None
    if not is_model_folder(folder):
        incomplete = f"{capital(found.where)} sent {repo_id} to this worker without a complete model"
        return f"{incomplete}; launch the run again.", None
    return None, folder


def sentence(exc: BaseException, url: str, repo_id: str, revision: str, source: str = "huggingface") -> str:
    """The sentence for a failed download: the lookup's sentences, a full disk, or a broken transfer."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        cache = "ModelScope's cache" if source == MODELSCOPE else "the Hugging Face cache"
        return f"The disk holding {cache} is full. Free some space, then download it again."
    if isinstance(exc, FileUnusable):
        return str(exc)
    if source == MODELSCOPE:
        from modelscope_hub import FileDownloadError

        failures = list(exc.failed_files.values()) if isinstance(exc, FileDownloadError) else [exc]
        first = failures[0] if failures else exc
        if isinstance(first, OSError) and first.errno == errno.ENOSPC:
            return sentence(first, url, repo_id, revision, source)
        said = modelscope.known_sentence(first, url, repo_id=repo_id, revision=revision)
    else:
        said = known_sentence(exc, url, repo_id=repo_id, revision=revision)
    return said or (
        f"The transfer of {repo_id} from {site_name(source, url)} broke off ({type(exc).__name__}: {exc}). "
        "Download it again: it resumes from the files that arrived."
    )


def main(argv: list[str] | None = None) -> int:
    def failed(exc: BaseException, row: ModelDownload | None) -> str:
        return sentence(exc, row.endpoint, row.repo_id, row.revision, row.source) if row else str(exc)

    def work(settings: Settings, db: Database, download_id: int, worker_id: str) -> None:
        fetch(settings, db, download_id, worker_id)

    return job_child(argv, what="download", table=ModelDownload, work=work, sentence=failed, said=SAID)


if __name__ == "__main__":
    sys.exit(main())
