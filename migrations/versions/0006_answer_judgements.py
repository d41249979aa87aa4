"""An optional judge's verdict on each scored answer: a score from 1 to 10 and its one-line reason.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run_answers") as batch:
        batch.add_column(sa.Column("judge_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("judge_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_answers") as batch:
        batch.drop_column("judge_reason")
        batch.drop_column("judge_score")
