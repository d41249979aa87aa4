"""The error shapes of the API, in one place.

- `/api/…`: `{"detail": [{"row", "field", "message"}, …]}`: one problem per bad value, with a sentence.
- `/v1/…`: OpenAI's `{"error": {"message", "type", "param", "code"}}`, so that OpenAI clients show it.
Pages get the same sentence in an HTML alert (`app.main`, `app.security.send_error`).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


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
