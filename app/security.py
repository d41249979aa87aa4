"""Access control for every request: an optional bearer token, a browser sign-in cookie, CSRF
protection for state-changing browser requests, and the upload size limit.

These are plain ASGI middlewares so that streaming responses (server-sent events) pass through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from html import escape
from http.cookies import SimpleCookie
from urllib.parse import quote

from app.config import Settings

SESSION_COOKIE = "tb_session"
CSRF_COOKIE = "tb_csrf"
CSRF_HEADER = b"x-csrf-token"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
OPEN_PATHS = ("/healthz", "/login", "/static/")
MULTIPART_SLACK = 64 * 1024  # multipart framing around the file itself


def session_value(token: str) -> str:
    """What the sign-in cookie holds: a keyed hash of the token, never the token itself."""
    return hmac.new(token.encode(), b"tuneboard-browser-session", hashlib.sha256).hexdigest()


def _headers(scope) -> dict[bytes, bytes]:
    return {key.lower(): value for key, value in scope.get("headers", [])}


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:
        return {}
    return {key: morsel.value for key, morsel in jar.items()}


def _wants_json(scope, headers: dict[bytes, bytes]) -> bool:
    path = scope["path"]
    return (path.startswith(("/api/", "/v1/")) and b"hx-request" not in headers) or (
        b"application/json" in headers.get(b"accept", b"") and b"text/html" not in headers.get(b"accept", b"")
    )


async def send_error(scope, send, headers: dict[bytes, bytes], status: int, message: str, extra=()) -> None:
    """A short error response: JSON for API clients, an HTML fragment for pages and htmx."""
    if _wants_json(scope, headers):
        body = json.dumps({"detail": [{"row": None, "field": None, "message": message}]}).encode()
        content_type = b"application/json"
    else:
        body = f'<div class="alert alert-error" role="alert"><p>{escape(message)}</p></div>'.encode()
        content_type = b"text/html; charset=utf-8"
    response_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


class AccessMiddleware:
    """Token check, then CSRF check; hands every request a CSRF token (`request.state.csrf_token`)."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.token = settings.token.get_secret_value() if settings.token else None
        self.cookie = session_value(self.token) if self.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        cookies = _cookies(headers)
        bearer = self._bearer_ok(headers)
        path = scope["path"]

        if self.token and not path.startswith(OPEN_PATHS):
            signed_in = bool(cookies.get(SESSION_COOKIE)) and hmac.compare_digest(
                cookies.get(SESSION_COOKIE, ""), self.cookie
            )
            if not (bearer or signed_in):
                await self._deny(scope, send, headers)
                return

        csrf = cookies.get(CSRF_COOKIE) or ""
        fresh = not csrf
        if fresh:
            csrf = secrets.token_urlsafe(32)
        if scope["method"] in UNSAFE_METHODS and not bearer and _from_browser(headers):
            sent = headers.get(CSRF_HEADER, b"").decode("latin-1")
            if not (sent and not fresh and hmac.compare_digest(sent, csrf)):
                await send_error(
                    scope,
                    send,
                    headers,
                    403,
                    "This page's security token is missing or out of date. Reload the page and try again.",
                )
                return
        scope.setdefault("state", {})["csrf_token"] = csrf

        async def send_with_cookie(message):
            if fresh and message["type"] == "http.response.start":
                cookie = f"{CSRF_COOKIE}={csrf}; Path=/; SameSite=Strict"
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())],
                }
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _bearer_ok(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not self.token or not auth.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())

    async def _deny(self, scope, send, headers) -> None:
        path = scope["path"]
        if path.startswith(("/api/", "/v1/")) or b"hx-request" in headers:
            await send_error(
                scope,
                send,
                headers,
                401,
                "Sign-in required: send 'Authorization: Bearer <token>' (the TUNEBOARD_TOKEN value).",
                extra=[(b"www-authenticate", b"Bearer")],
            )
            return
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "")
        location = f"/login?next={quote(target, safe='')}".encode()
        await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location)]})
        await send({"type": "http.response.body", "body": b""})


def _from_browser(headers: dict[bytes, bytes]) -> bool:
    """Browsers send Origin or Sec-Fetch-Site on every state-changing request; scripts and SDKs do not,
    and carry no ambient cookies that a forged request could abuse."""
    return b"origin" in headers or b"sec-fetch-site" in headers


class BodyLimitMiddleware:
    """Refuse request bodies over the upload limit with 413 before anything parses them."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.limit = settings.max_upload_bytes + MULTIPART_SLACK
        self.limit_mb = settings.max_upload_mb

    def _message(self) -> str:
        return (
            f"The file is larger than the {self.limit_mb:g} MB upload limit "
            "(TUNEBOARD_MAX_UPLOAD_MB). Nothing was stored."
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(scope, send, headers, 400, "The Content-Length header is not a number.")
                return
            if declared > self.limit:
                await send_error(scope, send, headers, 413, self._message())
                return
            await self.app(scope, receive, send)
            return
        # No declared length (chunked): read up to the limit before the application sees any of it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(scope, send, headers, 413, self._message())
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
