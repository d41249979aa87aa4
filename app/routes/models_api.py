"""JSON API for base models: list, register a local folder or GGUF file, unregister."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from app.deps import SessionDep, SettingsDep, WriteSessionDep
from app.errors import problem
from app.model_registry import (
    ModelPathInvalid,
    UnknownModel,
    list_models,
    register_model,
    registered_entry,
    unregister_model,
)
from app.schemas import ModelOut, ModelRegistration

router = APIRouter(prefix="/api/models", tags=["models"])


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


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, settings: SettingsDep, session: WriteSessionDep) -> None:
    try:
        unregister_model(settings, model_id, session=session)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None
