"""A fleet of workers: what each worker has (hardware, models, GPUs), draining and stopping from the
Workers page, the GPUs a run needs, and one row per attempt saying which worker trained it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("hardware", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("models", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("gpus", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("draining", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("stop_requested", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), server_default="0", nullable=False))
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


def downgrade() -> None:
    op.drop_table("run_attempts")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("gpus")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("stop_requested")
        batch.drop_column("draining")
        batch.drop_column("gpus")
        batch.drop_column("models")
        batch.drop_column("hardware")
