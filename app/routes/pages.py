"""HTML pages (htmx). Each page is one template; an htmx request gets one named block of it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse
from markupsafe import Markup
from sqlalchemy.orm import Session

from app import workers
from app.config import Settings
from app.datasets import store
from app.datasets.formats import FORMAT_LABELS, DatasetInvalid
from app.datasets.jobs import StatsPending
from app.deps import DatasetId, SessionDep, SettingsDep, WriteSessionDep, get_dataset_or_404
from app.model_registry import (
    ModelPathInvalid,
    UnknownModel,
    default_model,
    list_models,
    register_model,
    unregister_model,
)
from app.prompts import PROMPT_FORMATS
from app.routes.hub_pages import hub_context
from app.runs.config import DEFAULT_MAX_LENGTH
from app.web import hx_redirect, render

router = APIRouter(include_in_schema=False)


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, session: SessionDep):
    return render(
        request, "datasets.html", {"datasets": store.list_datasets(session=session), "labels": FORMAT_LABELS}
    )


@router.post("/datasets/upload", response_class=HTMLResponse)
async def upload_from_page(
    request: Request,
    settings: SettingsDep,
    then: str | None = None,
    file: Annotated[UploadFile | None, File()] = None,
    name: Annotated[str | None, Form()] = None,
):
    try:
        dataset = await store.save_upload(settings, request.app.state.db, file, name=name)
    except DatasetInvalid as exc:
        context = {
            "problems": exc.errors,
            "problem_count": exc.total,
            "summary": exc.summary,
            "filename": file.filename if file else None,
            "datasets": [],
            "labels": FORMAT_LABELS,
        }
        return render(request, "datasets.html", context, block="upload_result", status=422)
    if then == "new-run":  # uploaded from the New run page: back there with the new dataset chosen
        return hx_redirect(f"/runs/new?dataset={dataset.id}")
    return hx_redirect(f"/datasets/{dataset.id}")


def _stats_context(
    settings: Settings,
    session: Session,
    dataset,
    model: str | None,
    max_length: int | None,
    prompt_format: str,
) -> dict:
    models = list_models(settings, session=session)
    chosen = next((m for m in models if m.id == model), None)
    if chosen is None:
        chosen = default_model(models) or models[0]
    max_length = max_length or DEFAULT_MAX_LENGTH
    stats, problem = None, None
    if prompt_format not in PROMPT_FORMATS:
        prompt_format = "chat"
    pending = None
    if chosen.ready:
        try:
            stats = store.token_stats(
                settings, dataset, chosen, max_length=max_length, prompt_format=prompt_format
            )
        except StatsPending as exc:
            pending = exc
        except ValueError as exc:
            problem = str(exc)
    return {
        "models": models,
        "model": chosen,
        "max_length": max_length,
        "prompt_format": prompt_format,
        "prompt_formats": PROMPT_FORMATS,
        "stats": stats,
        "stats_problem": problem,
        "stats_pending": pending,
    }


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_page(
    request: Request,
    dataset_id: DatasetId,
    settings: SettingsDep,
    session: SessionDep,
    model: str | None = None,
    max_length: int | None = None,
    prompt_format: str = "chat",
):
    dataset = get_dataset_or_404(session, dataset_id)
    if max_length is not None and not 16 <= max_length <= 1_048_576:
        max_length = None
    try:
        summary, summary_pending = store.dataset_summary(settings, dataset), None
    except StatsPending as exc:
        summary, summary_pending = None, exc
    context = {
        "dataset": dataset,
        "label": FORMAT_LABELS[(dataset.format, dataset.layout)],
        "summary": summary,
        "summary_pending": summary_pending,
        "preview": store.preview_rows(settings, dataset.id),
        **_stats_context(settings, session, dataset, model, max_length, prompt_format),
    }
    target = request.headers.get("HX-Target")
    block = target if target in ("stats", "quality") else None
    return render(request, "dataset.html", context, block=block)


@router.delete("/datasets/{dataset_id}")
def delete_from_page(dataset_id: DatasetId, settings: SettingsDep, session: WriteSessionDep):
    try:
        store.delete_dataset(settings, get_dataset_or_404(session, dataset_id), session=session)
    except store.DatasetInUse as exc:
        alert = Markup('<div class="alert alert-error" role="alert"><p>{}</p></div>').format(str(exc))
        return HTMLResponse(alert, status_code=409)
    return hx_redirect("/datasets")


def models_context(settings, session, **extra) -> dict:
    """The Models page's body: the model list and the fetching card (its downloads and tokens)."""
    return {"models": list_models(settings, session=session)} | hub_context(settings, session) | extra


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, settings: SettingsDep, session: SessionDep):
    context = models_context(settings, session)
    target = request.headers.get("HX-Target") if request.headers.get("HX-Request") else None
    return render(request, "models.html", context, block="models_body" if target == "models-body" else None)


@router.post("/models", response_class=HTMLResponse)
def register_from_page(
    request: Request,
    settings: SettingsDep,
    session: WriteSessionDep,
    path: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
):
    try:
        register_model(settings, path, name or None, session=session)
    except ModelPathInvalid as exc:
        context = models_context(settings, session, register_error=str(exc), path=path, name=name)
        return render(request, "models.html", context, block="models_body", status=422)
    return render(request, "models.html", models_context(settings, session), block="models_body")


@router.delete("/models/{model_id}", response_class=HTMLResponse)
def unregister_from_page(
    request: Request,
    model_id: str,
    settings: SettingsDep,
    session: WriteSessionDep,
):
    try:
        unregister_model(settings, model_id, session=session)
    except UnknownModel as exc:
        context = models_context(settings, session, register_error=str(exc))
        return render(request, "models.html", context, block="models_body", status=404)
    return render(request, "models.html", models_context(settings, session), block="models_body")


@router.get("/workers", response_class=HTMLResponse)
def workers_page(request: Request, settings: SettingsDep, session: SessionDep, message: str | None = None):
    stale = settings.stale_after_seconds
    context = {
        "workers": workers.list_workers(session=session, stale_after=stale),
        "stale": f"{stale:g}",
        "message": message,
    }
    return render(request, "workers.html", context)


ORDER_SAID: dict[workers.Order, str] = {
    "drain": "{host} finishes its current run and takes no new ones.",
    "undrain": "{host} takes runs again.",
    "stop": "{host} stops at its next report; its run goes back to the queue.",
}


@router.post("/workers/orders", response_class=HTMLResponse)
def order_worker(
    request: Request,
    settings: SettingsDep,
    session: WriteSessionDep,
    worker_id: Annotated[str, Form(max_length=200)],
    what: Annotated[workers.Order, Form()],
):
    """Drain, undrain or stop a worker from the Workers page; it obeys at its next heartbeat."""
    try:
        row = workers.order(session=session, worker_id=worker_id, what=what)
    except LookupError:
        raise HTTPException(404, f"There is no worker {worker_id}.") from None
    session.commit()
    return workers_page(request, settings, session, message=ORDER_SAID[what].format(host=row.host))
