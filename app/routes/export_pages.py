"""The run page's Export card: choose what and in which format, see the size before starting, follow the
export's progress, download, delete, or make a GGUF export a base model."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app import exports
from app.deps import FormDep, RunId, SessionDep, SettingsDep, WriteSessionDep, get_run_or_404
from app.model_registry import ModelPathInvalid
from app.models import MAX_ID, WITH_ADAPTER, Run
from app.routes.exports_api import ExportId, get_export_or_404
from app.web import hx_redirect, render

router = APIRouter(include_in_schema=False)


def export_sources(settings, run: Run) -> list[tuple[int, str]]:
    """What can be exported: the final adapter (0) and each complete checkpoint, newest first."""
    folder = settings.run_folder(run.id)
    sources = []
    if run.status in WITH_ADAPTER and folder.has_adapter:
        source = folder.adapter_source()
        sources.append((0, f"Final adapter (step {source['step']})" if source else "Final adapter"))
    sources += [
        (c.step, f"Checkpoint at step {c.step}") for c in reversed(folder.checkpoints()) if c.has_adapter
    ]
    return sources


def estimate_context(settings, session, run: Run, step: int, format: str) -> dict:
    """The chosen format's sentence and size, or why it cannot be made."""
    try:
        plan = exports.plan(settings, session=session, run=run, step=step, format=format)
    except exports.ExportRefused as exc:
        return {"estimate": None, "refused": str(exc), "chosen": exports.FORMATS.get(format)}
    return {"estimate": plan.estimated_bytes, "refused": None, "chosen": plan.format}


ROW_HELPERS = {
    "formats": exports.FORMATS,
    "source_label": exports.source_label,
    "file_name": exports.file_name,
    "has_modelfile": exports.has_modelfile,
}


def list_context(settings, session, run: Run, error: str | None = None) -> dict:
    return ROW_HELPERS | {
        "run": run,
        "exports": exports.list_for_run(session=session, run_id=run.id),
        "export_error": error,
    }


def export_context(settings, session, run: Run) -> dict:
    """Everything the run page's Export card shows."""
    sources = export_sources(settings, run)
    context = list_context(settings, session, run) | {"export_sources": sources}
    if sources:
        context |= estimate_context(settings, session, run, sources[0][0], next(iter(exports.FORMATS)))
    return context


def _form_step(value) -> int:
    text = str(value or "0")
    if not text.isdigit() or int(text) > MAX_ID:
        raise exports.ExportRefused("Choose the final adapter or one of the run's checkpoints.")
    return int(text)


@router.get("/exports/{export_id}/row", response_class=HTMLResponse)
def export_row(request: Request, export_id: ExportId, session: SessionDep):
    """One export's row, polled every second while it is queued or being made (the finished row it
    becomes polls no more)."""
    export = get_export_or_404(session, export_id)
    return render(request, "run.html", ROW_HELPERS | {"e": export}, block="export_row")


@router.get("/runs/{run_id}/export-card", response_class=HTMLResponse)
def export_card(request: Request, run_id: RunId, settings: SettingsDep, session: SessionDep):
    """The whole card, polled while the run has nothing to export yet."""
    run = get_run_or_404(session, run_id)
    return render(request, "run.html", export_context(settings, session, run), block="export_card")


@router.post("/runs/{run_id}/exports/estimate", response_class=HTMLResponse)
def estimate_block(
    request: Request, run_id: RunId, settings: SettingsDep, session: SessionDep, form: FormDep
):
    run = get_run_or_404(session, run_id)
    try:
        step = _form_step(form.get("step"))
    except exports.ExportRefused as exc:
        context = {"run": run, "estimate": None, "refused": str(exc), "chosen": None}
    else:
        context = {"run": run} | estimate_context(settings, session, run, step, str(form.get("format") or ""))
    return render(request, "run.html", context, block="export_estimate")


@router.post("/runs/{run_id}/exports", response_class=HTMLResponse)
def export_from_page(
    request: Request, run_id: RunId, settings: SettingsDep, session: WriteSessionDep, form: FormDep
):
    run = get_run_or_404(session, run_id)
    error = None
    try:
        exports.request(
            settings,
            session=session,
            run=run,
            step=_form_step(form.get("step")),
            format=str(form.get("format")),
        )
    except exports.ExportRefused as exc:
        error = str(exc)
    return _list(request, settings, session, run, error)


def _list(request: Request, settings, session, run: Run, error: str | None):
    """The list of exports, with the sentence of a refusal above it (the list stays whole, so the card
    keeps working after one)."""
    context = list_context(settings, session, run, error)
    return render(request, "run.html", context, block="export_list", status=422 if error else 200)


@router.post("/exports/{export_id}/delete", response_class=HTMLResponse)
def delete_from_page(request: Request, export_id: ExportId, settings: SettingsDep, session: WriteSessionDep):
    export = get_export_or_404(session, export_id)
    run = get_run_or_404(session, export.run_id)
    error = None
    try:
        exports.delete(settings, session=session, export=export)
    except exports.ExportBusy as exc:
        error = str(exc)
    return _list(request, settings, session, run, error)


@router.post("/exports/{export_id}/register", response_class=HTMLResponse)
def register_from_page(
    request: Request, export_id: ExportId, settings: SettingsDep, session: WriteSessionDep
):
    export = get_export_or_404(session, export_id)
    run = get_run_or_404(session, export.run_id)
    try:
        exports.register(settings, session=session, export=export, run=run)
    except (exports.ExportRefused, ModelPathInvalid) as exc:
        return _list(request, settings, session, run, str(exc))
    return hx_redirect("/models")
