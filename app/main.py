"""The web application: FastAPI + Jinja2/htmx pages. It never imports torch (a test keeps it so)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from app.config import PROJECT_ROOT, Settings, get_settings
from app.datasets import jobs
from app.db import Database
from app.errors import openai_error, problem
from app.routes import auth, datasets_api, models_api, openai_api, pages, playground, run_pages, runs_api
from app.runs.events import Feeds
from app.security import (
    AccessMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    JsonBodyMiddleware,
    upload_limit,
)
from app.sessions import LoginThrottle
from app.web import make_templates, render

log = logging.getLogger("tuneboard.web")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        jobs.stop_all()
        app.state.db.dispose()

    app = FastAPI(title="Tuneboard", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.db = Database(settings.sqlalchemy_url)
    app.state.templates = make_templates()
    app.state.open_streams = 0
    app.state.feeds = Feeds(app.state.db)

    app.add_middleware(JsonBodyMiddleware)  # innermost: reads bodies already within the limit
    limit, message = upload_limit(settings)
    app.add_middleware(BodyLimitMiddleware, limit=limit, message=message)
    app.add_middleware(AccessMiddleware, settings=settings, db=app.state.db)
    app.add_middleware(HostCheckMiddleware, names=settings.host_names())  # outermost: runs first
    app.state.login_throttle = LoginThrottle(settings.login_attempts_per_minute)

    app.mount("/static", StaticFiles(directory=PROJECT_ROOT / "static"), name="static")
    app.mount("/examples", StaticFiles(directory=PROJECT_ROOT / "data" / "examples"), name="examples")
    for module in (auth, run_pages, pages, playground, datasets_api, models_api, runs_api, openai_api):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str | int]:
        with app.state.db.session() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok", "open_streams": app.state.open_streams}

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if _wants_page(request):
            message = exc.detail if isinstance(exc.detail, str) else "That request could not be completed."
            return render(
                request, "error.html", {"status": exc.status_code, "message": message}, status=exc.status_code
            )
        if request.url.path.startswith("/v1/"):
            message = exc.detail if isinstance(exc.detail, str) else "That request could not be completed."
            return openai_error(exc.status_code, message)
        detail = [problem(exc.detail)] if isinstance(exc.detail, str) else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = [
            problem(e["msg"], ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path")))
            for e in exc.errors()
        ]
        if request.url.path.startswith("/v1/"):
            first = problems[0]
            message = "; ".join(
                f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems
            )
            return openai_error(422, message, param=first["field"] or None)
        if _wants_page(request):
            message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
            return render(request, "error.html", {"status": 422, "message": message}, status=422)
        return JSONResponse({"detail": problems}, status_code=422)

    return app


def _wants_page(request: Request) -> bool:
    path = request.url.path
    return not path.startswith(("/api/", "/v1/")) and "text/html" in request.headers.get("accept", "")
