"""Recommenders keep their decoding: constrained (new default) or grounded.

Recommenders registered before this revision were measured by grounding, so they keep it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recommenders") as table:
        table.add_column(
            sa.Column("decoding", sa.String(length=16), nullable=False, server_default="grounded")
        )


def downgrade() -> None:
    with op.batch_alter_table("recommenders") as table:
        table.drop_column("decoding")
