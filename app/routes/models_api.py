"""JSON API for base models: list, register a local folder or GGUF file, unregister."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.deps import SessionDep, SettingsDep, WriteSessionDep
from app.errors import problem
from app.model_registry import (
    ModelPathInvalid,
    check_registration,
    error_file,
    list_models,
    registered_entry,
)
from app.models import RegisteredModel
from app.schemas import ModelOut, ModelRegistration

router = APIRouter(prefix="/api/models", tags=["models"])


def register_model(settings: Settings, body: ModelRegistration, *, session: Session) -> RegisteredModel:
    """Validate and record a local model. Raises ModelPathInvalid with a sentence for the user."""
    path, kind = check_registration(body.path)
    if session.scalar(select(RegisteredModel).where(RegisteredModel.path == str(path))):
        raise ModelPathInvalid(f"{path} is registered already.")
    name = (body.name or "").strip()[:200] or (path.stem if kind == "gguf" else path.name)
    model = RegisteredModel(name=name, path=str(path), kind=kind)
    session.add(model)
    session.commit()
    return model


def unregister_model(settings: Settings, model_id: str, *, session: Session) -> None:
    """Forget a registered model; a GGUF's converted copy goes too (the user's own files stay)."""
    number = model_id.removeprefix("local-")
    model = session.get(RegisteredModel, int(number)) if number.isdigit() and len(number) < 19 else None
    if model is None:
        raise HTTPException(
            404, f"There is no registered model '{model_id}' (only local-N models can be removed)."
        )
    entry = registered_entry(settings, model)
    session.delete(model)
    session.commit()
    if entry.source == "gguf" and entry.folder is not None:
        shutil.rmtree(entry.folder, ignore_errors=True)
        error_file(entry.folder).unlink(missing_ok=True)


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
        model = register_model(settings, body, session=session)
    except ModelPathInvalid as exc:
        raise HTTPException(422, [problem(str(exc), "path")]) from None
    return ModelOut(**registered_entry(settings, model).as_dict())


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, settings: SettingsDep, session: WriteSessionDep) -> None:
    unregister_model(settings, model_id, session=session)
