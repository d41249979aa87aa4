"""The web application: FastAPI + Jinja2/htmx pages. It never imports torch (a test keeps it so)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from app import hub
from app.config import PROJECT_ROOT, Settings, get_settings
from app.datasets import jobs
from app.db import Database
from app.errors import alert_fragment, error_kind, openai_error, problem
from app.providers.dispatch import Dispatcher
from app.routes import (
    artifacts_api,
    auth,
    cluster_pages,
    datasets_api,
    export_pages,
    exports_api,
    hub_pages,
    models_api,
    openai_api,
    pages,
    playground,
    publish_api,
    publish_pages,
    run_pages,
    runs_api,
    votes_api,
    workers_api,
)
from app.runs.events import Feeds
from app.runs.folder import sweep_leftovers
from app.security import (
    AccessMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    JsonBodyMiddleware,
    artifact_limit,
    upload_limit,
)
from app.sessions import LoginThrottle
from app.web import make_templates, render

log = logging.getLogger("tuneboard.web")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    hub.guard_tokens()  # a saved token goes to its hub, never elsewhere
    if swept := sweep_leftovers(settings.runs_dir):
        log.info("removed %d half-received or half-replaced folders left by a crash", swept)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # it sends runs to the clusters of providers.yaml, looking each heartbeat whether there is one
        dispatcher = Dispatcher(settings, app.state.db).start()
        yield
        dispatcher.close()
        jobs.stop_all()
        await app.state.feeds.close()
        app.state.db.dispose()

    app = FastAPI(title="Tuneboard", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.db = Database(settings.sqlalchemy_url)
    app.state.templates = make_templates()
    app.state.open_streams = 0
    app.state.feeds = Feeds(app.state.db)

    app.add_middleware(JsonBodyMiddleware)  # innermost: reads bodies already within the limit
    limit, message = upload_limit(settings)
    app.add_middleware(BodyLimitMiddleware, limit=limit, message=message, artifacts=artifact_limit(settings))
    app.add_middleware(AccessMiddleware, settings=settings, db=app.state.db)
    app.add_middleware(HostCheckMiddleware, names=settings.host_names())  # outermost: runs first
    app.state.login_throttle = LoginThrottle(settings.login_attempts_per_minute)

    app.mount("/static", StaticFiles(directory=PROJECT_ROOT / "static"), name="static")
    app.mount("/examples", StaticFiles(directory=PROJECT_ROOT / "data" / "examples"), name="examples")
    routers = (
        auth,
        run_pages,
        export_pages,
        hub_pages,
        publish_pages,
        cluster_pages,
        pages,
        playground,
        artifacts_api,
        datasets_api,
        exports_api,
        models_api,
        publish_api,
        runs_api,
        votes_api,
        workers_api,
        openai_api,
    )
    for module in routers:
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str | int]:
        with app.state.db.session() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok", "open_streams": app.state.open_streams}

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc.detail, str):
            problems = [problem(exc.detail)]
        else:
            problems = exc.detail  # a list of problems already (app.errors.problem)
        return error_response(request, exc.status_code, problems, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = [
            problem(e["msg"], ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path")))
            for e in exc.errors()
        ]
        return error_response(request, 422, problems)

    return app


def error_response(
    request: Request, status: int, problems: list[dict], headers: Mapping[str, str] | None = None
) -> Response:
    """Problems in the shape the caller understands (app.errors.error_kind)."""
    message = "; ".join(f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems)
    kind = error_kind(
        request.url.path, request.headers.get("accept", ""), htmx="HX-Request" in request.headers
    )
    if kind == "openai":
        return openai_error(status, message, param=problems[0]["field"] or None)
    if kind == "json":
        return JSONResponse({"detail": problems}, status_code=status, headers=headers)
    if kind == "fragment":
        return HTMLResponse(alert_fragment(message), status_code=status, headers=headers)
    return render(request, "error.html", {"status": status, "message": message}, status=status)
