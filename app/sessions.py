"""Browser sign-in sessions: a random value per sign-in in an HttpOnly cookie, its hash in the database.

A session ends when it expires (`TUNEBOARD_SESSION_HOURS`) or at sign-out, whichever comes first; the
server can end any session by deleting its row. Failed sign-ins are throttled per client address.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import defaultdict, deque
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.models import BrowserSession, utcnow

COOKIE = "tb_session"


def _key(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


def start(*, session: Session, hours: float) -> str:
    """A new sign-in: returns the cookie's value (stored only as a hash). Sweeps expired sessions."""
    now = utcnow()
    session.execute(delete(BrowserSession).where(BrowserSession.expires_at <= now))
    value = secrets.token_urlsafe(32)
    session.add(BrowserSession(id=_key(value), created_at=now, expires_at=now + timedelta(hours=hours)))
    session.commit()
    return value


def is_valid(value: str | None, *, session: Session) -> bool:
    if not value or len(value) > 200:
        return False
    row = session.get(BrowserSession, _key(value))
    return row is not None and row.expires_at > utcnow()


def end(value: str | None, *, session: Session) -> None:
    """Sign-out: this cookie opens nothing from now on."""
    if value:
        session.execute(delete(BrowserSession).where(BrowserSession.id == _key(value)))
        session.commit()


class LoginThrottle:
    """At most `limit` failed sign-ins per client address in any `window` seconds."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self.failures: dict[str, deque[float]] = defaultdict(deque)
        self.lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self.failures[client]
        while times and now - times[0] > self.window:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int:
        """Seconds this client must wait before its next try; 0 when it may try now."""
        now = time.monotonic()
        with self.lock:
            times = self._recent(client, now)
            if len(times) < self.limit:
                return 0
            return max(1, int(self.window - (now - times[0])) + 1)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self.lock:
            self._recent(client, now).append(now)
            if len(self.failures) > 10_000:  # forget the quiet ones; never grow without bound
                for key in [k for k, v in self.failures.items() if not v]:
                    del self.failures[key]
