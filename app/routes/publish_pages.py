"""The run page's Publish card: push the run's adapter or a finished export to a hub repository (private
by default) with a model card, follow the bytes sent, cancel."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app import exports, publishing
from app.deps import FormDep, RunId, SessionDep, SettingsDep, WriteSessionDep, get_run_or_404
from app.hub import endpoint, has_token, hub_name
from app.models import MAX_ID, WITH_ADAPTER, ExportStatus, Run
from app.routes.publish_api import PublicationId, get_publication_or_404
from app.web import render

router = APIRouter(include_in_schema=False)


def publish_context(settings, session, run: Run, error: str | None = None) -> dict:
    """Everything the Publish card shows."""
    url = endpoint()
    done = [
        e for e in exports.list_for_run(session=session, run_id=run.id) if e.status == ExportStatus.SUCCEEDED
    ]
    return {
        "run": run,
        "publishable": run.status in WITH_ADAPTER and settings.run_folder(run.id).has_adapter,
        "publish_sources": [("", "The adapter")]
        + [(str(e.id), f"{exports.FORMATS[e.format].label}, {exports.source_label(e.step)}") for e in done],
        "publish_hub": hub_name(url),
        "publish_token": has_token(settings, url),
        "publications": publishing.listed(session=session, run_id=run.id),
        "publish_error": error,
        "publish_name": re.sub(r"[^A-Za-z0-9._-]+", "-", run.name).strip("-.")[:60] or f"run-{run.id}",
        "formats": exports.FORMATS,
    }


@router.get("/runs/{run_id}/publish-card", response_class=HTMLResponse)
def publish_card(request: Request, run_id: RunId, settings: SettingsDep, session: SessionDep):
    """The whole card: polled every second while a push is under way."""
    run = get_run_or_404(session, run_id)
    return render(request, "run.html", publish_context(settings, session, run), block="publish_card")


@router.post("/runs/{run_id}/publications", response_class=HTMLResponse)
def publish_from_page(
    request: Request, run_id: RunId, settings: SettingsDep, session: WriteSessionDep, form: FormDep
):
    run = get_run_or_404(session, run_id)
    error = None
    source = str(form.get("source") or "")
    try:
        if source and (not source.isdigit() or int(source) > MAX_ID):
            raise publishing.PublishRefused("Choose the adapter or one of the run's finished exports.")
        publishing.request(
            settings,
            session=session,
            run=run,
            repo_id=str(form.get("repo_id") or ""),
            private=form.get("private") is not None,
            export_id=int(source) if source else None,
        )
    except publishing.PublishRefused as exc:
        error = str(exc)
    context = publish_context(settings, session, run, error)
    return render(request, "run.html", context, block="publish_card")


@router.post("/publications/{publication_id}/cancel", response_class=HTMLResponse)
def cancel_from_page(
    request: Request, publication_id: PublicationId, settings: SettingsDep, session: WriteSessionDep
):
    row = get_publication_or_404(session, publication_id)
    publishing.cancel(session=session, publication=row)
    run = get_run_or_404(session, row.run_id)
    return render(request, "run.html", publish_context(settings, session, run), block="publish_card")
