"""Access control for every request: the Host check, an optional bearer token, a browser sign-in cookie,
CSRF protection for state-changing browser requests, and the request size limit.

These are plain ASGI middlewares so that streaming responses (server-sent events) pass through untouched.
The generation host uses the same Host check, token check and size limit.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import secrets
from html import escape
from http.cookies import SimpleCookie
from urllib.parse import quote

import anyio

from app import jsontext, sessions
from app.config import Settings
from app.errors import alert_fragment, error_kind, openai_body, problem
from app.jsontext import JsonUnreadable

SESSION_COOKIE = sessions.COOKIE
CSRF_COOKIE = "tb_csrf"
CSRF_HEADER = b"x-csrf-token"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
OPEN_PATHS = ("/healthz", "/login", "/static/")
MULTIPART_SLACK = 64 * 1024  # multipart framing around the file itself
ERROR_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Tuneboard: {status}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;
padding:0 1rem;color:#1f2328}}
.alert{{border:1px solid #f5c2c0;background:#fdecea;border-radius:8px;padding:.75rem 1rem}}</style></head>
<body><h1>Tuneboard</h1><div class="alert alert-error" role="alert"><p>{message}</p></div></body></html>"""


def _headers(scope) -> dict[bytes, bytes]:
    return {key.lower(): value for key, value in scope.get("headers", [])}


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:
        return {}
    return {key: morsel.value for key, morsel in jar.items()}


async def send_error(
    scope, send, headers: dict[bytes, bytes], status: int, message: str, extra=(), field: str | None = None
) -> None:
    """A short error response: OpenAI's shape under /v1, JSON for API clients, an HTML fragment for pages
    and htmx."""
    accept = headers.get(b"accept", b"").decode("latin-1")
    kind = error_kind(scope["path"], accept, htmx=b"hx-request" in headers)
    if kind == "openai":
        body = json.dumps(openai_body(status, message, param=field)).encode()
        content_type = b"application/json"
    elif kind == "json":
        body = json.dumps({"detail": [problem(message, field)]}).encode()
        content_type = b"application/json"
    elif kind == "fragment":
        body = alert_fragment(message).encode()
        content_type = b"text/html; charset=utf-8"
    else:  # a whole page: a browser may land here with no stylesheet reachable (a refused Host)
        body = ERROR_PAGE.format(status=status, message=escape(message)).encode()
        content_type = b"text/html; charset=utf-8"
    response_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


def request_host(headers: dict[bytes, bytes]) -> str:
    """The Host header's name, lower case, without port or IPv6 brackets ("" when absent)."""
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheckMiddleware:
    """Answer 400 to a request whose Host header names this server by a name it was not given.

    This stops DNS rebinding: a page on another site whose name was made to resolve to 127.0.0.1 is
    same-origin with its own name, so without this check it could read every page and API. Bare IP
    addresses are allowed (no page can rebind a name to them); `names=None` turns the check off."""

    def __init__(self, app, names: frozenset[str] | None):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.names is None:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = request_host(headers)
        if host in self.names or _is_ip(host):
            await self.app(scope, receive, send)
            return
        shown = host[:100] or "(none)"
        await send_error(
            scope,
            send,
            headers,
            400,
            f"This server is not reached by the name '{shown}'. If that name is yours, add it to "
            "TUNEBOARD_ALLOWED_HOSTS on the server.",
        )


def bearer_ok(auth: str, token: str | None) -> bool:
    """Whether an Authorization header's value is `Bearer <token>` with the right token."""
    if not token or not auth.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(auth[7:].strip().encode("latin-1"), token.encode())


class AccessMiddleware:
    """Token check, then CSRF check; hands every request a CSRF token (`request.state.csrf_token`)."""

    def __init__(self, app, settings: Settings, db):
        self.app = app
        self.db = db
        self.token = settings.token.get_secret_value() if settings.token else None

    def _signed_in(self, value: str | None) -> bool:
        with self.db.session() as session:
            return sessions.is_valid(value, session=session)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if _cross_site_subrequest(scope, headers):
            message = (
                "Tuneboard does not answer what other sites' pages ask of it (images, scripts, frames, "
                "fetches); open it in its own tab."
            )
            await send_error(scope, send, headers, 403, message)
            return
        cookies = _cookies(headers)
        bearer = bearer_ok(headers.get(b"authorization", b"").decode("latin-1"), self.token)
        path = scope["path"]

        if self.token and not path.startswith(OPEN_PATHS):
            signed_in = not bearer and await anyio.to_thread.run_sync(
                self._signed_in, cookies.get(SESSION_COOKIE)
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
                if scope.get("scheme") == "https":
                    cookie += "; Secure"
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())],
                }
            await send(message)

        await self.app(scope, receive, send_with_cookie)

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


def _cross_site_subrequest(scope, headers: dict[bytes, bytes]) -> bool:
    """A request another site's page made the browser send without the user going there: anything but a
    top-level navigation (Fetch Metadata's resource isolation). Such a GET could otherwise make this
    server spend seconds of CPU (a leaderboard, a dataset's statistics) at any page's will. Clients that
    are not browsers send no Sec-Fetch-Site and pass."""
    if headers.get(b"sec-fetch-site") != b"cross-site":
        return False
    navigation = headers.get(b"sec-fetch-mode") == b"navigate" and headers.get(b"sec-fetch-dest") in (
        b"document",
        None,
    )
    return not (navigation and scope["method"] in ("GET", "HEAD"))


def _from_browser(headers: dict[bytes, bytes]) -> bool:
    """Browsers send Origin or Sec-Fetch-Site on every state-changing request; scripts and SDKs do not,
    and carry no ambient cookies that a forged request could abuse."""
    return b"origin" in headers or b"sec-fetch-site" in headers


def upload_limit(settings: Settings) -> tuple[int, str]:
    """The web server's body limit (bytes, and the sentence for a larger body): the upload limit plus
    multipart framing."""
    message = (
        f"The file is larger than the {settings.max_upload_mb:g} MB upload limit "
        "(TUNEBOARD_MAX_UPLOAD_MB). Nothing was stored."
    )
    return settings.max_upload_bytes + MULTIPART_SLACK, message


# A worker's uploads of a run's checkpoints, adapter and exports (app.routes.artifacts_api): larger than
# datasets, streamed to disk by their route rather than read whole.
ARTIFACT_UPLOAD = re.compile(r"^/api/(runs/\d+/(checkpoints/\d+\.tar|adapter\.tar)|exports/\d+/files\.tar)$")


def artifact_limit(settings: Settings) -> tuple[int, str]:
    message = (
        f"The file is larger than the {settings.max_artifact_mb:g} MB limit for a run's files "
        "(TUNEBOARD_MAX_ARTIFACT_MB). Nothing was stored."
    )
    return int(settings.max_artifact_mb * 1_000_000), message


class BodyLimitMiddleware:
    """Refuse request bodies over a limit with 413 before anything parses them. Artifact uploads have
    their own, larger limit and are streamed on to their route."""

    def __init__(self, app, limit: int, message: str, artifacts: tuple[int, str] | None = None):
        self.app = app
        self.limit = limit
        self.message = message
        self.artifacts = artifacts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.artifacts is not None and ARTIFACT_UPLOAD.match(scope["path"]):
            limit, message = self.artifacts
            declared = headers.get(b"content-length")
            if declared is None or not declared.isdigit():
                await send_error(scope, send, headers, 411, "A run's files are sent with a Content-Length.")
            elif int(declared) > limit:
                await send_error(scope, send, headers, 413, message)
            else:
                await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(scope, send, headers, 400, "The Content-Length header is not a number.")
                return
            if declared > self.limit:
                await send_error(scope, send, headers, 413, self.message)
                return
            await self.app(scope, receive, send)
            return
        # No declared length (chunked): read up to the limit before the application sees any of it.
        try:
            body = await read_body(receive, self.limit)
        except OverflowError:
            await send_error(scope, send, headers, 413, self.message)
            return
        if body is not None:
            await self.app(scope, _replay(body, receive), send)


class JsonBodyMiddleware:
    """Read a JSON request body with `app.jsontext` before the application does, so that nesting, huge
    numbers, NaN and unpaired surrogates get a 422 sentence naming the field instead of a 400 or a 500.
    The body, once read, is handed on unchanged. Runs inside the body limit."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope["method"] not in UNSAFE_METHODS
            or ARTIFACT_UPLOAD.match(scope["path"])  # archives, streamed to disk by their route
        ):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if b"json" not in headers.get(b"content-type", b"").lower():
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return
        if body.strip():
            try:
                jsontext.loads(body)
            except JsonUnreadable as exc:
                field = jsontext.dotted(exc.path) or None
                subject = f"The value at '{field}'" if field else "The request body"
                await send_error(scope, send, headers, 422, f"{subject} {exc.message}.", field=field)
                return
        await self.app(scope, _replay(body, receive), send)


async def read_body(receive, limit: int | None = None) -> bytes | None:
    """The whole request body; None if the client left first. OverflowError past `limit` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise OverflowError(size)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands on an already read body once, then whatever comes next (a disconnect)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
