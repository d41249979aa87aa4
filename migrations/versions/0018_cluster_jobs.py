"""Runs sent to a compute provider (a Slurm or Kubernetes cluster): the run names its provider, and each
scheduler job it became is a row of cluster_jobs (app.providers.dispatch).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# `runs` changes by plain ALTER TABLE both ways (SQLite has DROP COLUMN since 3.35): a batch operation would
# copy it into a new table and drop the old one, and with foreign keys on, that drop deletes every run's
# metrics.
def upgrade() -> None:
    op.add_column("runs", sa.Column("provider", sa.String(40), nullable=True))
    op.create_table(
        "cluster_jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("provider", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("job_id", sa.String(100), nullable=False),
        sa.Column("state", sa.String(30), nullable=False),
        sa.Column("reason", sa.String(300), nullable=True),
        sa.Column("node", sa.String(300), nullable=True),
        sa.Column("log", sa.String(1000), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_cluster_jobs_run_id", "cluster_jobs", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_cluster_jobs_run_id", table_name="cluster_jobs")
    op.drop_table("cluster_jobs")
    op.drop_column("runs", "provider")
