"""What a running run is doing now, in words (loading the model, scoring the base model's answers 16 of
40, training, scoring a checkpoint), for the run page; null when it is not running.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE both ways (SQLite has DROP COLUMN since 3.35): a batch operation would copy `runs` into a
# new table and drop the old one, and with foreign keys on that drop deletes every run's metrics and answers.
def upgrade() -> None:
    op.add_column("runs", sa.Column("phase", sa.String(200), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "phase")
