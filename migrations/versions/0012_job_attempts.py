"""One job queue: the attempts of every kind of job (runs to train, exports to make) are rows of one table,
`job_attempts`, keyed by the job's kind and id; the runs' attempts move there (kind `train`), and back on
downgrade.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COMMON = "attempt, worker_id, started_at, ended_at, outcome"


def upgrade() -> None:
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(12), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(12), nullable=True),
        sa.UniqueConstraint("kind", "job_id", "attempt", name="uq_job_attempts_kind_job_attempt"),
    )
    op.execute(
        f"INSERT INTO job_attempts (kind, job_id, {COMMON}) "
        f"SELECT 'train', run_id, {COMMON} FROM run_attempts ORDER BY id"
    )
    op.drop_table("run_attempts")


def downgrade() -> None:
    op.create_table(
        "run_attempts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(12), nullable=True),
        sa.UniqueConstraint("run_id", "attempt", name="uq_run_attempts_run_attempt"),
    )
    op.execute(
        f"INSERT INTO run_attempts (run_id, {COMMON}) "
        f"SELECT job_id, {COMMON} FROM job_attempts WHERE kind = 'train' ORDER BY id"
    )
    op.drop_table("job_attempts")
