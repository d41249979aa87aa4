"""Publishing over the API: queue the push of a run's adapter or finished export to a hub repository with a
generated model card, list a run's pushes, follow one, cancel it. The run page's Publish card
(app.routes.publish_pages) calls the same functions of app.publishing."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field

from app import publishing
from app.deps import RunId, SessionDep, SettingsDep, WriteSessionDep, get_or_404, get_run_or_404
from app.models import MAX_ID, WITH_ADAPTER, Publication, Run

router = APIRouter(tags=["publishing"])

PublicationId = Annotated[int, Path(ge=1, le=MAX_ID, description="a publication's id")]


class PublishRequest(BaseModel):
    repo_id: str = Field(max_length=200, description="owner/name of the repository to create or push to")
    private: bool = Field(True, description="a new repository is private unless this is false")
    export_id: int | None = Field(None, ge=1, le=MAX_ID, description="a finished export; none: the adapter")


class PublicationOut(BaseModel):
    id: int
    run_id: int
    export_id: int | None
    what: str
    repo_id: str
    private: bool
    endpoint: str
    status: str
    bytes_total: int
    bytes_done: int
    speed: float | None
    url: str | None
    error: str | None
    card: str
    created_at: datetime
    finished_at: datetime | None


def publication_out(row: Publication) -> PublicationOut:
    return PublicationOut.model_validate(row, from_attributes=True)


def get_publication_or_404(session, publication_id: int) -> Publication:
    return get_or_404(session, Publication, publication_id, "publication")


@router.post("/api/runs/{run_id}/publications", status_code=202)
def publish(
    run_id: RunId, body: PublishRequest, settings: SettingsDep, session: WriteSessionDep
) -> PublicationOut:
    """Queue the push of the run's adapter, or of one of its finished exports, with a model card."""
    run = get_run_or_404(session, run_id)
    _has_adapter(settings, run)
    try:
        row = publishing.request(
            settings,
            session=session,
            run=run,
            repo_id=body.repo_id,
            private=body.private,
            export_id=body.export_id,
        )
    except publishing.PublishRefused as exc:
        raise HTTPException(422, str(exc)) from None
    return publication_out(row)


@router.get("/api/runs/{run_id}/publications")
def list_publications(run_id: RunId, session: SessionDep) -> list[PublicationOut]:
    get_run_or_404(session, run_id)
    return [publication_out(row) for row in publishing.listed(session=session, run_id=run_id)]


@router.get("/api/publications/{publication_id}")
def get_publication(publication_id: PublicationId, session: SessionDep) -> PublicationOut:
    return publication_out(get_publication_or_404(session, publication_id))


@router.post("/api/publications/{publication_id}/cancel")
def cancel_publication(publication_id: PublicationId, session: WriteSessionDep) -> PublicationOut:
    row = get_publication_or_404(session, publication_id)
    publishing.cancel(session=session, publication=row)
    return publication_out(row)


def _has_adapter(settings, run: Run) -> None:
    if run.status not in WITH_ADAPTER or not settings.run_folder(run.id).has_adapter:
        raise HTTPException(
            409,
            f"Run {run.id} has no adapter to publish yet (it is {run.status}); publish it once it has one.",
        )
