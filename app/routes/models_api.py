"""JSON API for base models: list, register a local folder or GGUF file, unregister; look a model up by
name on the Hugging Face Hub (or its mirror) and download it; the Hub token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response

from app import downloads, hub
from app.deps import SessionDep, SettingsDep, WriteSessionDep, get_or_404
from app.errors import problem
from app.model_registry import (
    ModelPathInvalid,
    UnknownModel,
    list_models,
    register_model,
    registered_entry,
    unregister_model,
)
from app.models import MAX_ID, ModelDownload
from app.schemas import (
    DownloadOut,
    HubModelAsk,
    HubModelOut,
    HubToken,
    ModelOut,
    ModelRegistration,
    Source,
)

router = APIRouter(prefix="/api/models", tags=["models"])
DownloadId = Annotated[int, Path(ge=1, le=MAX_ID, description="a download's id")]


@router.get("")
def get_models(settings: SettingsDep, session: SessionDep) -> list[ModelOut]:
    return [ModelOut(**m.as_dict()) for m in list_models(settings, session=session)]


@router.post("", status_code=201)
def post_model(
    body: ModelRegistration,
    settings: SettingsDep,
    session: WriteSessionDep,
) -> ModelOut:
    try:
        model = register_model(settings, body.path, body.name, session=session)
    except ModelPathInvalid as exc:
        raise HTTPException(422, [problem(str(exc), "path")]) from None
    return ModelOut(**registered_entry(settings, model).as_dict())


# --- fetched by name --------------------------------------------------------------------------------------


def hub_model_out(model: hub.HubModel) -> HubModelOut:
    return HubModelOut(
        repo_id=model.repo_id,
        revision=model.revision,
        commit=model.commit,
        endpoint=model.endpoint,
        source=model.source,
        files=model.files,
        size_bytes=model.size,
        license=model.license,
        gated=model.gated,
        architecture=model.architecture,
        refusal=model.refusal,
        disk_free_bytes=model.disk_free,
        files_left_out=model.others,
    )


def download_out(row: ModelDownload) -> DownloadOut:
    return DownloadOut(
        id=row.id,
        repo_id=row.repo_id,
        revision=row.revision,
        endpoint=row.endpoint,
        source=row.source,
        status=row.status,
        bytes_done=row.bytes_done,
        bytes_total=row.bytes_total,
        speed_bytes_per_second=row.speed,
        attempts=row.attempts,
        error=row.error,
        created_at=row.created_at,
        finished_at=row.finished_at,
    )


@router.post("/lookup")
def lookup_model(body: HubModelAsk, settings: SettingsDep) -> HubModelOut:
    """What downloading a model by name would bring: its files and size, licence, whether it is gated,
    whether Tuneboard can train it and whether the disk has room. Nothing is downloaded."""
    try:
        return hub_model_out(hub.lookup(settings, body.repo_id, body.revision, body.source))
    except hub.HubProblem as exc:
        raise HTTPException(422, [problem(str(exc), "repo_id")]) from None


@router.post("/downloads", status_code=201)
def post_download(
    body: HubModelAsk, response: Response, settings: SettingsDep, session: WriteSessionDep
) -> DownloadOut:
    """Look the model up and queue its download (201), or give the download already under way (200)."""
    try:
        model = hub.lookup(settings, body.repo_id, body.revision, body.source)
        row, queued = downloads.request(session=session, model=model)
    except (hub.HubProblem, downloads.DownloadRefused) as exc:
        raise HTTPException(422, [problem(str(exc), "repo_id")]) from None
    if not queued:
        response.status_code = 200
    return download_out(row)


@router.get("/downloads")
def get_downloads(session: SessionDep) -> list[DownloadOut]:
    return [download_out(row) for row in downloads.listed(session=session)]


def get_download_or_404(session, download_id: int) -> ModelDownload:
    return get_or_404(session, ModelDownload, download_id, "download")


@router.get("/downloads/{download_id}")
def get_download(download_id: DownloadId, session: SessionDep) -> DownloadOut:
    return download_out(get_download_or_404(session, download_id))


@router.post("/downloads/{download_id}/cancel")
def cancel_download(download_id: DownloadId, session: WriteSessionDep) -> DownloadOut:
    row = get_download_or_404(session, download_id)
    downloads.cancel(session=session, download=row)
    return download_out(row)


@router.post("/downloads/{download_id}/retry")
def retry_download(download_id: DownloadId, session: WriteSessionDep) -> DownloadOut:
    """Queue a failed or cancelled download again: it resumes from the files that arrived."""
    row = get_download_or_404(session, download_id)
    downloads.retry(session=session, download=row)
    return download_out(row)


@router.put("/hub-token", status_code=204)
def put_token(body: HubToken, settings: SettingsDep) -> None:
    """Check a token with the hub this server downloads from (of the Hugging Face Hub, or ModelScope) and
    keep it for that hub only."""
    try:
        hub.save_token(settings, hub.source_endpoint(body.source), body.token, body.source)
    except hub.HubProblem as exc:
        raise HTTPException(422, [problem(str(exc), "token")]) from None


@router.delete("/hub-token", status_code=204)
def delete_token(settings: SettingsDep, source: Source = "huggingface") -> None:
    hub.forget_token(settings, hub.source_endpoint(source))


# last: its path would take /api/models/hub-token and /api/models/downloads for model ids
@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, settings: SettingsDep, session: WriteSessionDep) -> None:
    try:
        unregister_model(settings, model_id, session=session)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None
