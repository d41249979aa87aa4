"""Browser sign-in when a token is configured: one form, one random session per sign-in."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app import sessions
from app.web import hx_redirect, render

router = APIRouter(include_in_schema=False)


def safe_next(target: str | None) -> str:
    """Only same-site paths: never redirect a sign-in to another host.

    Browsers drop tabs and newlines from a URL and read a backslash as a slash, so `/<TAB>/evil.example`
    would become `//evil.example`: any control character, space or backslash refuses the target, and what
    remains must parse as a bare path."""
    if not target or len(target) > 2000:
        return "/"
    if any(ord(c) < 0x21 or c in "\\\x7f" for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None):
    if request.app.state.settings.token is None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"):
    settings = request.app.state.settings
    if settings.token is None:
        return hx_redirect(safe_next(next))
    throttle = request.app.state.login_throttle
    client = request.client.host if request.client else "unknown"
    context = {"next": safe_next(next)}
    wait = throttle.retry_after(client)
    if wait:
        context["error"] = f"Too many wrong tokens from this address. Try again in {wait} seconds."
        response = render(request, "login.html", context, block="login_form", status=429)
        response.headers["Retry-After"] = str(wait)
        return response
    if not hmac.compare_digest(token.strip().encode(), settings.token.get_secret_value().encode()):
        throttle.failed(client)
        context["error"] = "That token is not right. It is the value of TUNEBOARD_TOKEN."
        return render(request, "login.html", context, block="login_form", status=401)
    with request.app.state.db.write_session() as session:
        value = sessions.start(session=session, hours=settings.session_hours)
    response = hx_redirect(safe_next(next))
    response.set_cookie(
        sessions.COOKIE,
        value,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        max_age=int(settings.session_hours * 3600),
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    with request.app.state.db.write_session() as session:
        sessions.end(request.cookies.get(sessions.COOKIE), session=session)
    response = hx_redirect("/login")
    response.delete_cookie(sessions.COOKIE)
    return response
