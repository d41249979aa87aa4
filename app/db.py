"""Engine and sessions.

SQLite is the embedded default; DATABASE_URL may name PostgreSQL. Everything SQLite-specific lives in
`_configure_sqlite` below: WAL mode, a busy timeout, foreign keys, and transactions that begin with
`BEGIN IMMEDIATE` when a session announces that it is going to write (see `write_session`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_MS = 10_000


class PassingFault(Exception):
    """A fault of Tuneboard's own that passes by itself (the web server briefly unreachable, say): a
    worker logs it and tries again with backoff."""


# Faults that pass, the one list: the database busy or briefly unreachable, a file that vanished under us,
# and Tuneboard's own passing faults. Long-lived loops log them and carry on; anything else is a bug or a
# fatal setting.
PASSING_FAULTS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, OSError, PassingFault)
_IMMEDIATE = "tuneboard_immediate"


def make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    """SQLite only: pragmas on every connection, and explicit BEGIN so that writers can ask for
    IMMEDIATE (take the write lock up front instead of failing to upgrade a read lock later)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # let the "begin" hook below emit BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """The process's engine and session factory."""

    def __init__(self, url: str):
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Every transaction of a write session takes the write lock at BEGIN, not only its first: domain
        # functions commit, and a second transaction that began as a read would fail at once ("database
        # is locked", no busy wait) if another writer committed in between.
        self.write_sessions = sessionmaker(
            self.engine.execution_options(**{_IMMEDIATE: True}), expire_on_commit=False
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (or a write that cannot conflict); commit explicitly."""
        with self.sessions() as session:
            yield session

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A session whose transactions take the write lock at BEGIN; commits when the block ends
        without an exception and rolls back otherwise."""
        with self.write_sessions() as session:
            yield session
            session.commit()

    def dispose(self) -> None:
        self.engine.dispose()
