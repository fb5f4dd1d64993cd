"""The schema of mlflow-dock 0.1.0, as `create_all` made it before Alembic.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

from alembic import op
from sqlalchemy.schema import CreateIndex, CreateTable

from mlflow_dock.store.migrations import baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The very statements `create_all` ran, from the frozen definitions (baseline.py) that
    # also bring a pre-Alembic database up to this revision.
    for table in baseline.tables().sorted_tables:
        op.execute(CreateTable(table))
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            op.execute(CreateIndex(index))


def downgrade() -> None:
    for table in reversed(baseline.tables().sorted_tables):
        op.drop_table(table.name)
