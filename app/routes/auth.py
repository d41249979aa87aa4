"""Browser sign-in when a token is configured: one form, one cookie."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.security import SESSION_COOKIE, session_value
from app.web import hx_redirect, render

router = APIRouter(include_in_schema=False)


def _safe_next(target: str | None) -> str:
    """Only same-site paths: never redirect a sign-in to another host."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None):
    if request.app.state.settings.token is None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"):
    secret = request.app.state.settings.token
    if secret is None:
        return hx_redirect(_safe_next(next))
    if not hmac.compare_digest(token.strip().encode(), secret.get_secret_value().encode()):
        context = {
            "next": _safe_next(next),
            "error": "That token is not right. It is the value of TUNEBOARD_TOKEN.",
        }
        return render(request, "login.html", context, block="login_form", status=401)
    response = hx_redirect(_safe_next(next))
    response.set_cookie(
        SESSION_COOKIE,
        session_value(secret.get_secret_value()),
        httponly=True,
        samesite="lax",
        max_age=30 * 86400,
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = hx_redirect("/login")
    response.delete_cookie(SESSION_COOKIE)
    return response
