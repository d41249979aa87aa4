"""Base models fetched by name from a hub: one row per download, a job of the queue like a run or an
export (app.downloads).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_downloads",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("repo_id", sa.String(200), nullable=False),
        sa.Column("revision", sa.String(100), nullable=False),
        sa.Column("commit", sa.String(100), nullable=False),
        sa.Column("endpoint", sa.String(300), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("speed", sa.Float(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_model_downloads_status_id", "model_downloads", ["status", "id"])
    # one download under way per model, revision and hub, however many requests ask for it at once
    active = sa.text("status IN ('queued', 'running')")
    op.create_index(
        "uq_model_downloads_active",
        "model_downloads",
        ["repo_id", "revision", "endpoint"],
        unique=True,
        sqlite_where=active,
        postgresql_where=active,
    )


def downgrade() -> None:
    op.drop_index("uq_model_downloads_active", table_name="model_downloads")
    op.drop_index("ix_model_downloads_status_id", table_name="model_downloads")
    op.drop_table("model_downloads")
