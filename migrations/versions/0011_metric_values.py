"""Metrics are data: a logged point keeps its values as one JSON object (any numeric key a training process
logs) instead of a column per metric. Every value of the columns it replaces moves into the object, and
back on downgrade.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the per-metric columns of revisions 0002 and 0010, in their order
COLUMNS = (
    "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "step_time",
    "memory_mb", "gpu_memory_mb", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
)  # fmt: skip
BATCH = 5000
# SQLite rebuilds the table to drop columns: keep AUTOINCREMENT, so that ids are never reused (they order the
# live streams, whose clients resume after the last id they saw)
KEEP = {"table_kwargs": {"sqlite_autoincrement": True}}


def _metrics(columns: Sequence[str]) -> sa.Table:
    return sa.table("run_metrics", sa.column("id", sa.Integer), *(sa.column(c, sa.Float) for c in columns))


def upgrade() -> None:
    with op.batch_alter_table("run_metrics") as batch:
        batch.add_column(sa.Column("values", sa.JSON(), nullable=False, server_default="{}"))
    connection = op.get_bind()
    old = _metrics(COLUMNS)
    target = sa.table("run_metrics", sa.column("id", sa.Integer), sa.column("values", sa.JSON))
    last = 0
    while True:
        rows = connection.execute(sa.select(old).where(old.c.id > last).order_by(old.c.id).limit(BATCH)).all()
        if not rows:
            break
        for row in rows:
            values = {c: getattr(row, c) for c in COLUMNS if getattr(row, c) is not None}
            connection.execute(sa.update(target).where(target.c.id == row.id).values(values=values))
        last = rows[-1].id
    with op.batch_alter_table("run_metrics", **KEEP) as batch:
        batch.alter_column("values", server_default=None)
        for name in COLUMNS:
            batch.drop_column(name)


def downgrade() -> None:
    with op.batch_alter_table("run_metrics") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))
    connection = op.get_bind()
    source = sa.table("run_metrics", sa.column("id", sa.Integer), sa.column("values", sa.JSON))
    old = _metrics(COLUMNS)
    last = 0
    while True:
        rows = connection.execute(
            sa.select(source).where(source.c.id > last).order_by(source.c.id).limit(BATCH)
        ).all()
        if not rows:
            break
        for row in rows:
            values = row.values if isinstance(row.values, dict) else json.loads(row.values or "{}")
            kept = {c: values[c] for c in COLUMNS if isinstance(values.get(c), int | float)}
            if kept:
                connection.execute(sa.update(old).where(old.c.id == row.id).values(**kept))
        last = rows[-1].id
    with op.batch_alter_table("run_metrics", **KEEP) as batch:
        batch.drop_column("values")
