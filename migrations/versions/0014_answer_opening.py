"""Each scored answer's opening score: chrF of its first sentence against the reference's (app.scoring),
where a long answer names what it is about; null for answers scored before it existed.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE both ways, as in 0013 (a batch operation would rebuild the table).
def upgrade() -> None:
    op.add_column("run_answers", sa.Column("opening", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("run_answers", "opening")
