"""The error shapes of the API, in one place.

- `/api/…`: `{"detail": [{"row", "field", "message"}, …]}`: one problem per bad value, with a sentence.
- `/v1/…`: OpenAI's `{"error": {"message", "type", "param", "code"}}`, so that OpenAI clients show it.
Pages get the same sentence in an HTML alert: a whole page for a browser, a fragment for htmx.
`error_kind` decides which, for the routes' exception handlers (`app.main`) and for the middlewares that
answer before any route (`app.security.send_error`).
"""

from __future__ import annotations

from html import escape
from typing import Any, Literal

from fastapi.responses import JSONResponse

ErrorKind = Literal["openai", "json", "fragment", "page"]


def error_kind(path: str, accept: str, *, htmx: bool) -> ErrorKind:
    """How an error is answered: OpenAI's shape under /v1; an alert fragment for htmx (app.js shows its
    sentence); JSON for the API and for clients that ask for JSON rather than HTML; otherwise a page."""
    if path.startswith("/v1/"):
        return "openai"
    if htmx:
        return "fragment"
    if path.startswith("/api/") or ("application/json" in accept and "text/html" not in accept):
        return "json"
    return "page"


def alert_fragment(message: str) -> str:
    return f'<div class="alert alert-error" role="alert"><p>{escape(message)}</p></div>'


def problem(message: str, field: str | None = None, row: int | None = None) -> dict[str, Any]:
    return {"row": row, "field": field, "message": sentence(message)}


def sentence(text: str) -> str:
    """Validation libraries' phrases ("Input should be a valid integer") as sentences."""
    text = text.strip().removeprefix("Value error, ")
    return text if text.endswith((".", "!", "?", ")")) else text + "."


def openai_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(openai_body(status, message, param=param, code=code), status_code=status)
