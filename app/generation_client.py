"""The web server's side of the generation host: send one question, yield the host's events as dicts.

Every failure becomes an `error` event with a sentence, so the pages and the API show the same words.
Leaving the loop early (the browser stopped or went away) closes the connection, and the host stops
generating for that request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from app.config import Settings
from app.playground import GenerationEvent

NOT_RUNNING = (
    "The generation host is not running, so no model can answer. It starts with the worker: run "
    "`make run` (or `tuneboard worker`) and try again in a moment."
)


def _headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.token.get_secret_value()}"} if settings.token else {}


async def generate(settings: Settings, body: dict[str, Any]) -> AsyncGenerator[GenerationEvent]:
    timeout = httpx.Timeout(10.0, read=None)  # an answer may take minutes; connecting may not
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=_headers(settings)) as client:
            async with client.stream(
                "POST", f"{settings.generation_base_url}/generate", json=body
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    message, field = _message(response)
                    yield {
                        "type": "error",
                        "status": response.status_code,
                        "message": message,
                        "field": field,
                    }
                    return
                async for line in response.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
    except httpx.ConnectError:
        yield {"type": "error", "status": 503, "message": NOT_RUNNING}
    except httpx.HTTPError as exc:
        yield {"type": "error", "status": 502, "message": f"The generation host stopped answering ({exc})."}


def _message(response: httpx.Response) -> tuple[str, str | None]:
    """The host's sentence and the field it blames: its own `{"message", "field"}` refusals, or the
    `{"detail": [problem]}` shape of its validation and middleware errors."""
    try:
        body = response.json()
        if "message" in body:
            return str(body["message"]), body.get("field")
        first = body["detail"][0]
        return str(first["message"]), first.get("field")
    except (ValueError, KeyError, TypeError, IndexError):
        return f"The generation host answered {response.status_code}.", None


def is_up(settings: Settings) -> bool:
    """A quick look (for pages): does the generation host answer?"""
    try:
        return httpx.get(f"{settings.generation_base_url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def status(settings: Settings) -> dict[str, Any] | None:
    """The host's health and what it has loaded, or None when it is not reachable."""
    try:
        async with httpx.AsyncClient(timeout=2.0, headers=_headers(settings)) as client:
            response = await client.get(f"{settings.generation_base_url}/healthz")
            return response.json() if response.status_code == 200 else None
    except httpx.HTTPError:
        return None
