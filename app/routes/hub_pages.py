"""The Models page's fetching by name: look a model up on the Hub (or its mirror) or on ModelScope, queue
its download, follow, cancel or retry it, and keep a token for each site. HTML fragments for htmx; the
JSON API is models_api."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse

from app import downloads, hub
from app.deps import SessionDep, SettingsDep, WriteSessionDep
from app.models import ModelDownload
from app.routes.models_api import DownloadId
from app.web import render

router = APIRouter()


def hub_context(settings, session) -> dict:
    """What the Models page's fetching part shows: the hub, whether a token is kept for it, the downloads."""
    url = hub.endpoint()
    listed = downloads.listed(session=session)
    sites = {source: hub.source_endpoint(source) for source in hub.SOURCES}
    return {
        "hub_url": url,
        "hub_name": hub.hub_name(url),
        "modelscope_name": hub.site_name(hub.MODELSCOPE, sites[hub.MODELSCOPE]),
        "sources": hub.SOURCES,
        "token_sites": {source: hub.site_name(source, site) for source, site in sites.items()},
        "tokens": {source: hub.has_token(settings, site) for source, site in sites.items()},
        "downloads": listed,
        "downloading": any(d.status in downloads.ACTIVE for d in listed),
    }


@router.post("/models/lookup", response_class=HTMLResponse)
def lookup_from_page(
    request: Request,
    settings: SettingsDep,
    repo_id: Annotated[str, Form(max_length=300)] = "",
    revision: Annotated[str, Form(max_length=200)] = "",
    source: Annotated[str, Form(max_length=40)] = hub.HUGGINGFACE,
):
    try:
        context: dict = {"found": hub.lookup(settings, repo_id, revision or None, source), "problem": None}
    except hub.HubProblem as exc:
        context = {"found": None, "problem": str(exc)}
    return render(
        request, "models.html", context, block="hub_lookup", status=422 if context["problem"] else 200
    )


@router.post("/models/downloads", response_class=HTMLResponse)
def download_from_page(
    request: Request,
    settings: SettingsDep,
    session: WriteSessionDep,
    repo_id: Annotated[str, Form(max_length=300)] = "",
    revision: Annotated[str, Form(max_length=200)] = "",
    source: Annotated[str, Form(max_length=40)] = hub.HUGGINGFACE,
):
    problem = None
    try:
        downloads.request(session=session, model=hub.lookup(settings, repo_id, revision or None, source))
    except (hub.HubProblem, downloads.DownloadRefused) as exc:
        problem = str(exc)
    context = hub_context(settings, session) | {"download_problem": problem}
    return render(request, "models.html", context, block="hub_downloads", status=422 if problem else 200)


@router.get("/models/downloads", response_class=HTMLResponse)
def downloads_block(request: Request, settings: SettingsDep, session: SessionDep, was: str = ""):
    """The downloads, polled while one is under way. When the last one ends, the page's model list is told
    to refresh (a finished download is a new model)."""
    context = hub_context(settings, session)
    response = render(request, "models.html", context, block="hub_downloads")
    if was == "active" and not context["downloading"]:
        response.headers["HX-Trigger"] = "models-changed"
    return response


def _act(request: Request, settings, session, download_id: int, action) -> HTMLResponse:
    row = session.get(ModelDownload, download_id)
    if row is not None:
        action(session=session, download=row)
    return render(request, "models.html", hub_context(settings, session), block="hub_downloads")


@router.post("/models/downloads/{download_id}/cancel", response_class=HTMLResponse)
def cancel_from_page(
    request: Request, download_id: DownloadId, settings: SettingsDep, session: WriteSessionDep
):
    return _act(request, settings, session, download_id, downloads.cancel)


@router.post("/models/downloads/{download_id}/retry", response_class=HTMLResponse)
def retry_from_page(
    request: Request, download_id: DownloadId, settings: SettingsDep, session: WriteSessionDep
):
    return _act(request, settings, session, download_id, downloads.retry)


@router.post("/models/hub-token", response_class=HTMLResponse)
def token_from_page(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    token: Annotated[str, Form(max_length=300)] = "",
    source: Annotated[str, Form(max_length=40)] = hub.HUGGINGFACE,
    forget: Annotated[str, Form(max_length=40)] = "",
):
    said, problem = None, None
    source = forget or source
    if source not in hub.SOURCES:
        source = hub.HUGGINGFACE
    url = hub.source_endpoint(source)
    where = hub.site_name(source, url)
    if forget:
        hub.forget_token(settings, url)
        said = f"The token for {where} is forgotten."
    else:
        try:
            account = hub.save_token(settings, url, token, source)
            said = f"Token saved for {where} ({account}). It is sent there only, and never shown."
        except hub.HubProblem as exc:
            problem = str(exc)
    context = hub_context(settings, session) | {"token_said": said, "token_problem": problem}
    return render(request, "models.html", context, block="hub_token", status=422 if problem else 200)
