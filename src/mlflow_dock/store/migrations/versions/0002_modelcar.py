"""Jobs record the version's KServe Modelcar and the name its image answers to over V2.

Revision ID: 0002_modelcar
Revises: 0001
Create Date: 2026-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_modelcar"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: every job before this revision has neither (its image speaks MLflow's protocol
    # only and has no Modelcar), and alias jobs of versions without one keep NULL.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("modelcar", sa.String(700), nullable=True))
        batch.add_column(sa.Column("v2_model", sa.String(500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("v2_model")
        batch.drop_column("modelcar")
