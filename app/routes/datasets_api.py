"""JSON API for datasets: upload, list, show, preview rows, token statistics, delete."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from app.datasets import store
from app.datasets.formats import DatasetInvalid, preference_record
from app.datasets.jobs import StatsPending
from app.deps import DatasetId, SessionDep, SettingsDep, WriteSessionDep, get_dataset_or_404
from app.model_registry import BUNDLED_ID, find_model
from app.prompts import PROMPT_FORMATS
from app.runs.config import DEFAULT_MAX_LENGTH
from app.schemas import DatasetOut

router = APIRouter(prefix="/api/datasets", tags=["datasets"])


def invalid_response(exc: DatasetInvalid) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={
            "detail": [e.as_dict() for e in exc.errors],
            "error_count": exc.total,
            "message": exc.summary,
        },
    )


@router.post("", status_code=201, response_model=None)
async def upload_dataset(
    request: Request,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File()] = None,
    name: Annotated[str | None, Form()] = None,
) -> dict[str, Any] | JSONResponse:
    try:
        dataset = await store.save_upload(settings, request.app.state.db, file, name=name)
    except DatasetInvalid as exc:
        return invalid_response(exc)
    return DatasetOut.of(dataset).model_dump(mode="json")


@router.get("")
def list_datasets(session: SessionDep) -> list[DatasetOut]:
    return [DatasetOut.of(d) for d in store.list_datasets(session=session)]


@router.get("/{dataset_id}")
def show_dataset(dataset_id: DatasetId, settings: SettingsDep, session: SessionDep) -> dict[str, Any]:
    dataset = get_dataset_or_404(session, dataset_id)
    try:
        summary = store.dataset_summary(settings, dataset)
    except StatsPending as exc:
        summary = {"summary": exc.as_dict()}
    return {**DatasetOut.of(dataset).model_dump(mode="json"), **summary}


@router.get("/{dataset_id}/rows")
def dataset_rows(
    dataset_id: DatasetId,
    settings: SettingsDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 10,
) -> list[dict[str, Any]]:
    """The first rows, cut for reading (`store.preview_rows`); rows.jsonl has them whole."""
    get_dataset_or_404(session, dataset_id)
    return store.preview_rows(settings, dataset_id, limit=limit)


@router.get("/{dataset_id}/preferences.jsonl")
def preference_rows(dataset_id: DatasetId, settings: SettingsDep, session: SessionDep) -> StreamingResponse:
    """A preference dataset in TRL's conversational layout (prompt, chosen, rejected), one row a line."""
    dataset = get_dataset_or_404(session, dataset_id)
    if dataset.format != "preference":
        raise HTTPException(
            409,
            f"Dataset {dataset_id} holds {dataset.format} rows, not preferences (prompt, chosen, rejected).",
        )
    rows = store.iter_rows(store.dataset_dir(settings, dataset_id) / store.ROWS_FILE)
    lines = (json.dumps(preference_record(row), ensure_ascii=False) + "\n" for row in rows)
    return StreamingResponse(
        lines,
        media_type="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="dataset-{dataset_id}-preferences.jsonl"'},
    )


@router.get("/{dataset_id}/stats", response_model=None)
def dataset_token_stats(
    dataset_id: DatasetId,
    settings: SettingsDep,
    session: SessionDep,
    model: str | None = None,
    max_length: Annotated[int | None, Query(ge=16, le=1_048_576)] = None,
    prompt_format: str = "chat",
) -> dict[str, Any] | JSONResponse:
    dataset = get_dataset_or_404(session, dataset_id)
    if prompt_format not in PROMPT_FORMATS:
        raise HTTPException(422, f"prompt_format must be one of: {', '.join(PROMPT_FORMATS)}.")
    entry = find_model(settings, model or BUNDLED_ID, session=session)
    if entry is None:
        raise HTTPException(404, f"There is no model '{model}'. GET /api/models lists them.")
    if not entry.ready:
        raise HTTPException(
            409, f"{entry.name} is not ready ({entry.status}): {entry.error or 'try again shortly.'}"
        )
    try:
        lengths = store.token_stats(
            settings,
            dataset,
            entry,
            max_length=max_length or DEFAULT_MAX_LENGTH,
            prompt_format=prompt_format,
        )
    except StatsPending as exc:
        return JSONResponse(exc.as_dict(), status_code=202)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"model": entry.id, "prompt_format": prompt_format, **lengths}


@router.delete("/{dataset_id}", status_code=204)
def remove_dataset(dataset_id: DatasetId, settings: SettingsDep, session: WriteSessionDep) -> None:
    try:
        store.delete_dataset(settings, get_dataset_or_404(session, dataset_id), session=session)
    except store.DatasetInUse as exc:
        raise HTTPException(409, str(exc)) from None
