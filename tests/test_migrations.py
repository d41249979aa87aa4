"""The schema comes only from the migrations, and they produce exactly the models' schema."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db import make_engine
from app.migrate import alembic_config
from app.models import Base


@pytest.mark.databases
def test_migrations_produce_the_models_schema(settings):
    engine = make_engine(settings.sqlalchemy_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(settings):
    engine = make_engine(settings.sqlalchemy_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    engine.dispose()


@pytest.mark.databases
def test_downgrade_to_base_and_back(settings):
    config = alembic_config(settings)
    command.downgrade(config, "base")
    engine = make_engine(settings.sqlalchemy_url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    command.upgrade(config, "head")
    assert {"datasets", "registered_models"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_every_transaction_of_a_write_session_takes_the_write_lock(settings):
    """Regression: domain functions commit, and the write session's next transaction began as a read;
    under load its first write then failed at once with "database is locked" (no busy wait)."""
    import sqlite3

    from sqlalchemy import text

    from app.db import Database

    db = Database(settings.sqlalchemy_url)
    try:
        with db.write_session() as session:
            session.execute(text("SELECT 1"))
            session.commit()
            session.execute(text("SELECT 1"))  # a second transaction: it must hold the write lock too
            other = sqlite3.connect(settings.data_dir / "tuneboard.db", timeout=0.1, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
    finally:
        db.dispose()
