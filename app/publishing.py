"""Publishing: a run's adapter, or one of its finished exports, pushed to a repository on the Hugging Face Hub
(or the mirror `HF_ENDPOINT` names) with a generated model card. The one owner of `publications` rows: the
web tier checks the request and writes the card (app.model_card); a worker takes the push from the queue
(app.jobs' PUBLISH kind) and sends the files with the `huggingface_hub` client (worker/publish.py),
reporting the bytes sent; the run page shows the progress and may cancel it.

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled

The push uses the token saved for that hub on the Models page (app.hub), which must be allowed to write.
Repositories are private unless the user says otherwise.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import exports, jobs
from app.config import Settings
from app.hub import HubProblem, check_id, endpoint, has_token, hub_name
from app.model_card import model_card
from app.model_registry import hub_id
from app.models import Export, ExportStatus, Publication, Run, utcnow
from app.runs.folder import ADAPTER_CONFIG

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
ADAPTER = "adapter"
CARD = "README.md"
SHOWN = 10  # publications listed on a run's page, newest first
SHOWN_FOR = timedelta(days=30)


class PublishRefused(ValueError):
    """A publication that cannot be queued, with its sentence."""


@dataclass(frozen=True)
class RepoFile:
    """One file of the repository to push: its name there, its size, and how to read it."""

    name: str
    size: int
    open: Callable[[], BinaryIO]


def _adapter_files(folder: Path, base: str | None) -> list[RepoFile]:
    """The adapter's files. PEFT's own README (a template with blanks) gives way to Tuneboard's card; the
    adapter's config names its base model by its Hub id where it has one, so that `AutoPeftModelForCausalLM`
    finds it, and by nothing where it has none (this server's path to the model means nothing elsewhere)."""
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CARD and p.name[0] != ".")
    chosen = []
    for path in paths:
        if path.name == ADAPTER_CONFIG:
            config = json.loads(path.read_text(encoding="utf-8")) | {"base_model_name_or_path": base}
            chosen.append(_text_file(path.name, json.dumps(config, indent=2, sort_keys=True)))
        else:
            chosen.append(RepoFile(path.name, path.stat().st_size, _opener(path)))
    return chosen


def _text_file(name: str, text: str) -> RepoFile:
    data = text.encode("utf-8")
    return RepoFile(name, len(data), _bytes(data))


def _modelfile(path: Path) -> RepoFile:
    """An export's Modelfile, its FROM naming a file by this server's path (a LoRA GGUF's base model) cut to
    the file's name: whoever downloads it keeps that file beside it."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^FROM (/\S*/)([^/\s]+)$", r"FROM ./\2", text)
    return _text_file(path.name, text)


def _bytes(data: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(data)


def _opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: path.open("rb")


def _zip_files(path: Path) -> list[RepoFile]:
    """A merged export's files, read from its zip as they are sent (stored, not compressed: the sizes are
    the files' own). The zip's one top folder is left out of the names."""
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir()]

    def opener(name: str) -> Callable[[], BinaryIO]:
        def open_member() -> BinaryIO:
            archive = zipfile.ZipFile(path)
            member = archive.open(name)
            member._tuneboard_archive = archive  # type: ignore[attr-defined]  # kept open while it is read
            return member  # type: ignore[return-value]  # a ZipExtFile is a seekable BufferedIOBase

        return open_member

    return [RepoFile(m.filename.split("/", 1)[-1], m.file_size, opener(m.filename)) for m in members]


def files(settings: Settings, publication: Publication, run: Run, export: Export | None) -> list[RepoFile]:
    """The files to push besides the card: the adapter's folder, a merged export's files, or a GGUF export's
    file with its Modelfile. PublishRefused when they are gone."""
    if publication.what == ADAPTER:
        folder = settings.run_folder(publication.run_id).adapter
        if not (folder / ADAPTER_CONFIG).is_file():
            raise PublishRefused(f"Run {publication.run_id}'s adapter is no longer on disk.")
        return _adapter_files(folder, hub_id(run.base_model))
    if export is None or export.status != ExportStatus.SUCCEEDED:
        raise PublishRefused("The export to publish was deleted, or is not finished.")
    main = exports.export_file(settings, export)
    if not main.is_file():
        raise PublishRefused(f"The export's file {main.name} is no longer on disk: export it again.")
    if export.format == "merged":
        return _zip_files(main)
    chosen = [RepoFile(main.name, main.stat().st_size, _opener(main))]
    modelfile = exports.modelfile_path(settings, export)
    if modelfile.is_file():
        chosen.append(_modelfile(modelfile))
    return chosen


def card_file(publication: Publication) -> RepoFile:
    return _text_file(CARD, publication.card)


def check_repo(repo_id: str) -> str:
    """A repository id to create or push to: owner/name, as the Hub spells them."""
    repo_id = repo_id.strip()
    if not repo_id:
        raise PublishRefused("Name the repository to publish to: owner/name, such as your-name/my-adapter.")
    if "/" not in repo_id:
        raise PublishRefused(
            f"{repo_id[:100]!r} names no owner: write owner/name, such as "
            f"your-name/{repo_id[:60] or 'my-adapter'} (your account or an organisation you may write to)."
        )
    try:
        repo_id, _ = check_id(repo_id, None)
    except HubProblem:
        raise PublishRefused(
            f"{repo_id[:100]!r} is not a repository id: owner/name, with letters, digits, '-', '_' and '.'."
        ) from None
    return repo_id


def request(
    settings: Settings,
    *,
    session: Session,
    run: Run,
    repo_id: str,
    private: bool = True,
    export_id: int | None = None,
) -> Publication:
    """Queue the push of the run's adapter (no `export_id`) or of one of its finished exports."""
    repo_id = check_repo(repo_id)
    url = endpoint()
    if not has_token(settings, url):
        raise PublishRefused(
            f"Publishing needs a Hugging Face token with write access for {hub_name(url)}: save one on the "
            "Models page (it is kept on this server, never shown)."
        )
    export = None
    if export_id is not None:
        export = session.get(Export, export_id)
        if export is None or export.run_id != run.id:
            raise PublishRefused(f"Run {run.id} has no export {export_id}.")
        if export.status != ExportStatus.SUCCEEDED:
            raise PublishRefused("That export is not finished yet; publish it once it is.")
    what = export.format if export is not None else ADAPTER
    file_name = exports.file_name(export) if export is not None else None
    publication = Publication(
        run_id=run.id,
        export_id=export_id,
        what=what,
        repo_id=repo_id,
        private=private,
        endpoint=url,
        card=model_card(session, run, what=what, repo_id=repo_id, endpoint=url, file_name=file_name),
        status=QUEUED,
    )
    publication.bytes_total = sum(
        f.size for f in [*files(settings, publication, run, export), card_file(publication)]
    )
    session.add(publication)
    session.commit()
    return publication


def listed(*, session: Session, run_id: int) -> list[Publication]:
    rows = session.scalars(
        select(Publication).where(Publication.run_id == run_id).order_by(Publication.id.desc()).limit(SHOWN)
    ).all()
    return [r for r in rows if r.finished_at is None or utcnow() - r.finished_at < SHOWN_FOR]


def cancel(*, session: Session, publication: Publication) -> None:
    """A queued push ends at once; a running one is stopped by its worker within a heartbeat (a commit the
    hub has already accepted stays there)."""
    if publication.status == QUEUED:
        publication.status, publication.finished_at = CANCELLED, utcnow()
    elif publication.status == RUNNING:
        publication.cancel_requested = True
    session.commit()


def report(*, session: Session, publication_id: int, worker_id: str, done: int, speed: float | None) -> bool:
    """The worker's heartbeat with the bytes sent. False: stop."""
    return jobs.transfer_beat(
        session=session, kind=jobs.PUBLISH, job_id=publication_id, worker_id=worker_id, done=done, speed=speed
    )


def end(
    *,
    session: Session,
    publication_id: int,
    worker_id: str,
    status: str,
    error: str | None = None,
    url: str | None = None,
) -> bool:
    return jobs.transfer_end(
        session=session,
        kind=jobs.PUBLISH,
        job_id=publication_id,
        worker_id=worker_id,
        status=status,
        error=error,
        url=url,
    )
