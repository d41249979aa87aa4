"""Preference metrics: each logged point of a DPO or KTO run carries the trainer's implicit rewards for
the chosen and the rejected answers, their margin and (DPO) how often the chosen one wins.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def upgrade() -> None:
    with op.batch_alter_table("run_metrics") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_metrics") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
