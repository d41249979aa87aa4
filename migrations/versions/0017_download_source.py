"""A model download names where it comes from: the Hugging Face Hub (or a mirror of it) or ModelScope.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_downloads") as batch:
        batch.add_column(sa.Column("source", sa.String(20), nullable=False, server_default="huggingface"))


def downgrade() -> None:
    with op.batch_alter_table("model_downloads") as batch:
        batch.drop_column("source")
