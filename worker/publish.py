"""Publications, pushed by a worker: `run_publish` (in the worker loop) starts `python -m worker.publish ID`,
keeps the worker's heartbeat, and records how the push ended; the child creates the repository (private
unless asked otherwise) and sends the files and the model card in one commit with the `huggingface_hub`
client, reporting the bytes sent, and stops when the push is cancelled.

Each file goes to the client as a stream that counts what is read from it once the client has hashed it,
so the bytes on the page are the bytes sent (a stream also keeps the client on its plain HTTP upload,
which every hub and mirror speaks).
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import BinaryIO, cast

from app import jobs, publishing
from app.config import Settings
from app.db import Database
from app.hub import capital, guard_tokens, hub_name, known_sentence, token_for
from app.models import Export, Publication, Run
from worker.child import CANCELLED, DONE, BytesReporter, Cancelled, job_child, job_tick, run_child
from worker.supervise import write_with_retry

log = logging.getLogger("tuneboard.publish")
SAID = "tuneboard-publish-error:"  # the child's own sentence on a failure it can explain


# --- in the worker loop -----------------------------------------------------------------------------------


def run_publish(
    settings: Settings, db: Database, publication: Publication, *, me: str, stop: threading.Event, **_
) -> None:
    """Push one claimed publication from a child process and record how it ended. A worker stopping hands
    it back to the queue (the next attempt sends the files again)."""
    log.info("publication %d: run %d's %s to %s", publication.id, publication.run_id, publication.what,
             publication.repo_id)  # fmt: skip
    cancelled = threading.Event()
    kind, job_id = jobs.PUBLISH, publication.id
    tick = job_tick(db, me=me, kind=kind, job_id=job_id, status="publishing", stop=stop, cancelled=cancelled)
    ended = run_child(
        [sys.executable, "-m", "worker.publish", str(job_id), "--worker", me],
        stop=stop,
        env=settings.child_env(),
        tick=tick,
        every=1.0,
    )
    if ended.code is None and not cancelled.is_set():  # the worker is stopping
        write_with_retry(db, lambda s: jobs.hand_back(session=s, kind=kind, job_id=job_id, worker_id=me))
        return
    url = None
    if ended.code == 0:
        status, error = publishing.SUCCEEDED, None
        url = next(
            (line.split(DONE, 1)[1].strip() for line in ended.stderr.splitlines() if DONE in line), None
        )
    elif ended.code == CANCELLED or cancelled.is_set():
        status, error = publishing.CANCELLED, None
    else:
        status, error = publishing.FAILED, ended.reason(SAID)
    write_with_retry(
        db,
        lambda s: publishing.end(
            session=s, publication_id=job_id, worker_id=me, status=status, error=error, url=url
        ),
    )
    log.info("publication %d %s%s", job_id, status, f": {error}" if error else "")


# --- in the child -----------------------------------------------------------------------------------------


class Sent:
    """The bytes sent of every file of one push: each file's furthest read, once counting is on (the client
    reads a file once to hash it before it sends it, may read the card again to check its metadata, and
    rewinds a file to send it again after a failed try: none of that counts twice). Files are read from
    several threads at once for large uploads."""

    def __init__(self, report: BytesReporter, total: int):
        self.report, self.total = report, total
        self.furthest: dict[int, int] = {}
        self.counting = False
        self.lock = threading.Lock()

    def read_to(self, stream: int, position: int) -> None:
        if not self.counting:
            return
        with self.lock:
            if position <= self.furthest.get(stream, 0):
                return
            self.furthest[stream] = position
            sent = min(self.total, sum(self.furthest.values()))
            self.report(sent)  # raises Cancelled once the push is cancelled


class Counted(io.BufferedIOBase):
    """A file being sent: reads pass through to `source`, and how far it has been read goes to `sent`."""

    def __init__(self, source: BinaryIO, sent: Sent):
        self.source, self.sent = source, sent

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.source.seek(offset, whence)

    def tell(self) -> int:
        return self.source.tell()

    def read(self, size: int | None = -1) -> bytes:
        data = self.source.read(-1 if size is None else size)
        if data:
            self.sent.read_to(id(self), self.source.tell())
        return data

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def close(self) -> None:
        self.source.close()
        archive = getattr(self.source, "_tuneboard_archive", None)
        if archive is not None:
            archive.close()
        super().close()


def push(settings: Settings, db: Database, publication_id: int, worker_id: str) -> str:
    """Create the repository (a new one: an existing repository of that name is refused, so that nothing
    is overwritten or made public by a typo; a retried push finds the one its first attempt made) and commit
    the files; the commit's address."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with db.session() as session:
        row = session.get(Publication, publication_id)
        if row is None:
            raise Cancelled
        export = session.get(Export, row.export_id) if row.export_id is not None else None
        run = session.get(Run, row.run_id)
        if run is None:  # deleted since (its publications go with it)
            raise Cancelled
        chosen = [*publishing.files(settings, row, run, export), publishing.card_file(row)]
        repo_id, private, url, what, retried = (
            row.repo_id,
            row.private,
            row.endpoint,
            row.what,
            row.attempts > 1,
        )
        session.expunge(row)

    def send(session, done: int, speed: float | None) -> bool:
        return publishing.report(
            session=session, publication_id=publication_id, worker_id=worker_id, done=done, speed=speed
        )

    report = BytesReporter(db, send)
    report(0, force=True)
    guard_tokens(url)
    api = HfApi(endpoint=url, token=token_for(settings, url))
    try:
        api.create_repo(repo_id, private=private, repo_type="model")
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409 or not retried:
            raise
    sent = Sent(report, sum(f.size for f in chosen))
    streams: list[Counted] = []
    try:
        for f in chosen:
            streams.append(Counted(f.open(), sent))
        operations = [
            CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=cast(BinaryIO, stream))  # hashed, rewound
            for f, stream in zip(chosen, streams, strict=True)
        ]
        sent.counting = True
        what_label = "adapter" if what == publishing.ADAPTER else f"{what} export"
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=f"Tuneboard: run {row.run_id}'s {what_label}",
            repo_type="model",
        )
    finally:
        for stream in streams:
            stream.close()
    try:  # the hub has the commit: a cancel arriving now changes nothing
        report(sent.total, force=True)
    except Cancelled:
        pass
    return str(commit.commit_url)


def sentence(exc: BaseException, url: str, repo_id: str) -> str:
    """The sentence for a failed push."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, publishing.PublishRefused):
        return str(exc)
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return (
                f"{capital(hub_name(url))} refused to let the saved token write to {repo_id} "
                f"(HTTP {status}): save a token with write access on the Models page, and check that the "
                "owner is your account or an organisation you may write to."
            )
        if status == 409 and "repos/create" in str(exc.response.request.url):
            return (
                f"{repo_id} exists already on {hub_name(url)}: publish to a new name (Tuneboard creates the "
                "repository, so that nothing in one of yours is overwritten)."
            )
    return known_sentence(exc, url, repo_id=repo_id, what=repo_id) or (
        f"The push to {repo_id} on {hub_name(url)} broke off ({type(exc).__name__}: {exc}). Publish it again."
    )


def main(argv: list[str] | None = None) -> int:
    def failed(exc: BaseException, row: Publication | None) -> str:
        return sentence(exc, row.endpoint, row.repo_id) if row else str(exc)

    return job_child(argv, what="push", table=Publication, work=push, sentence=failed, said=SAID)


if __name__ == "__main__":
    sys.exit(main())
