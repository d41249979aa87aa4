"""Exports over the API: size one up, queue it (or get the one already made), follow it, download its
files, delete it, and make a GGUF export a base model. The run page's card (app.routes.export_pages) calls
the same functions of app.exports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from app import exports
from app.deps import RunId, SessionDep, SettingsDep, WriteSessionDep, get_or_404, get_run_or_404
from app.model_registry import ModelPathInvalid, registered_entry
from app.models import MAX_ID, Export, ExportStatus
from app.schemas import ModelOut

router = APIRouter(tags=["exports"])

ExportId = Annotated[int, Path(ge=1, le=MAX_ID, description="an export's id")]
Step = Field(0, ge=0, le=MAX_ID, description="0: the run's final adapter; else that checkpoint's step")


class ExportRequest(BaseModel):
    format: str = Field(description=f"one of {', '.join(exports.FORMATS)}")
    step: int = Step


class ExportOut(BaseModel):
    id: int
    run_id: int
    step: int
    format: str
    label: str
    status: str
    progress: float
    stage: str | None
    estimated_bytes: int
    size_bytes: int | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    download_url: str | None
    modelfile_url: str | None


def export_out(export: Export) -> ExportOut:
    done = export.status == ExportStatus.SUCCEEDED
    return ExportOut(
        id=export.id,
        run_id=export.run_id,
        step=export.step,
        format=export.format,
        label=exports.FORMATS[export.format].label,
        status=export.status,
        progress=export.progress,
        stage=export.stage,
        estimated_bytes=export.estimated_bytes,
        size_bytes=export.size_bytes,
        error=export.error,
        created_at=export.created_at,
        finished_at=export.finished_at,
        download_url=f"/api/exports/{export.id}/file" if done else None,
        modelfile_url=f"/api/exports/{export.id}/modelfile"
        if done and exports.has_modelfile(export)
        else None,
    )


def get_export_or_404(session, export_id: int) -> Export:
    return get_or_404(session, Export, export_id, "export")


@router.get("/api/runs/{run_id}/exports/estimate")
def estimate_export(
    run_id: RunId,
    settings: SettingsDep,
    session: SessionDep,
    format: Annotated[str, Query()],
    step: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> dict:
    """The size an export would have, or why it cannot be made (422)."""
    run = get_run_or_404(session, run_id)
    try:
        plan = exports.plan(settings, session=session, run=run, step=step, format=format)
    except exports.ExportRefused as exc:
        raise HTTPException(422, str(exc)) from None
    return {"format": format, "step": step, "estimated_bytes": plan.estimated_bytes}


@router.get("/api/runs/{run_id}/exports")
def list_exports(run_id: RunId, session: SessionDep) -> list[ExportOut]:
    get_run_or_404(session, run_id)
    return [export_out(e) for e in exports.list_for_run(session=session, run_id=run_id)]


@router.post("/api/runs/{run_id}/exports", status_code=201)
def request_export(
    run_id: RunId, body: ExportRequest, response: Response, settings: SettingsDep, session: WriteSessionDep
) -> ExportOut:
    """Queue an export (201), or answer the one already made or under way (200)."""
    run = get_run_or_404(session, run_id)
    try:
        export, queued = exports.request(
            settings, session=session, run=run, step=body.step, format=body.format
        )
    except exports.ExportRefused as exc:
        raise HTTPException(422, str(exc)) from None
    if not queued:
        response.status_code = 200
    return export_out(export)


@router.get("/api/exports/{export_id}")
def show_export(export_id: ExportId, session: SessionDep) -> ExportOut:
    return export_out(get_export_or_404(session, export_id))


def _finished_file(settings, session, export_id: int):
    export = get_export_or_404(session, export_id)
    path = exports.export_file(settings, export)
    if export.status != ExportStatus.SUCCEEDED or not path.is_file():
        raise HTTPException(404, f"Export {export_id} has no file yet (it is {export.status}).")
    return export, path


@router.get("/api/exports/{export_id}/file")
def download_export(export_id: ExportId, settings: SettingsDep, session: SessionDep) -> FileResponse:
    export, path = _finished_file(settings, session, export_id)
    media = "application/zip" if path.suffix == ".zip" else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=path.name)


@router.get("/api/exports/{export_id}/modelfile")
def download_modelfile(export_id: ExportId, settings: SettingsDep, session: SessionDep) -> FileResponse:
    export, _ = _finished_file(settings, session, export_id)
    path = exports.modelfile_path(settings, export)
    if not exports.has_modelfile(export) or not path.is_file():
        raise HTTPException(404, f"Export {export_id} has no Modelfile (only GGUF exports have one).")
    return FileResponse(path, media_type="text/plain; charset=utf-8", filename=exports.MODELFILE)


@router.delete("/api/exports/{export_id}", status_code=204)
def delete_export(export_id: ExportId, settings: SettingsDep, session: WriteSessionDep) -> Response:
    try:
        exports.delete(settings, session=session, export=get_export_or_404(session, export_id))
    except exports.ExportBusy as exc:
        raise HTTPException(409, str(exc)) from None
    return Response(status_code=204)


@router.post("/api/exports/{export_id}/register", status_code=201)
def register_export(export_id: ExportId, settings: SettingsDep, session: WriteSessionDep) -> ModelOut:
    """Make a finished GGUF export a base model (the worker converts it, as any GGUF model)."""
    export = get_export_or_404(session, export_id)
    run = get_run_or_404(session, export.run_id)
    try:
        model = exports.register(settings, session=session, export=export, run=run)
    except (exports.ExportRefused, ModelPathInvalid) as exc:
        raise HTTPException(422, str(exc)) from None
    return ModelOut(**registered_entry(settings, model).as_dict())
