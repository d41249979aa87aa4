"""Jinja2 templates with named blocks (an htmx request renders just one block of a page)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request
from fastapi.responses import Response
from jinja2_fragments.fastapi import Jinja2Blocks

from app import workers
from app.config import PROJECT_ROOT
from app.datasets.split import MIN_ROWS_TO_HOLD_OUT
from app.peft_methods import method as peft_method
from app.units import filesize


def ago(moment: datetime, *, seconds: bool = False) -> str:
    """'3 minutes ago'; with `seconds`, recent moments to the second ('4 s ago'), for heartbeats."""
    elapsed = int((datetime.now(UTC) - moment).total_seconds())
    for span, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if elapsed >= span:
            n = elapsed // span
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return f"{max(elapsed, 0)} s ago" if seconds else "just now"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def count(value: int | None) -> str:
    """12 345 678 → 12.3M"""
    if value is None:
        return "—"
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return str(value)


def make_templates() -> Jinja2Blocks:
    templates = Jinja2Blocks(directory=str(PROJECT_ROOT / "templates"))
    templates.env.filters["filesize"] = filesize
    templates.env.filters["ago"] = ago
    templates.env.filters["duration"] = duration
    templates.env.filters["count"] = count
    templates.env.globals["peft_method"] = peft_method  # a run's method, as the registry declares it
    templates.env.globals["min_rows_to_hold_out"] = MIN_ROWS_TO_HOLD_OUT
    return templates


def providers_file(settings):
    from app.providers.config import providers_file as path

    return path(settings)


def render(request: Request, template: str, context: dict, *, block: str | None = None, status: int = 200):
    """A page, or just one named block of it for an htmx swap."""
    templates = request.app.state.templates
    settings = request.app.state.settings
    context = {"settings": settings, "csrf_token": request.state.csrf_token, **context}
    if block is None:  # a whole page: say so when no worker is alive
        with request.app.state.db.session() as session:
            context["workers_alive"] = workers.any_alive(
                session=session, stale_after=settings.stale_after_seconds
            )
        context["clusters"] = providers_file(settings).exists()  # runs may go to a cluster instead
    response = templates.TemplateResponse(request, template, context, status_code=status, block_name=block)
    response.headers["Vary"] = "HX-Request"
    return response


def hx_redirect(url: str) -> Response:
    """Tell htmx to navigate (a full page load) once the request succeeded."""
    return Response(status_code=204, headers={"HX-Redirect": url})
