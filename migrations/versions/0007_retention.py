"""Retention: tenants' retention policies, jobs' data-deletion records, tombstones of data
sets and model versions, superseded versions and the admin's reason to keep one.

Revision ID: 0007_retention
Revises: 0006_linearized
Create Date: 2026-12-02 03:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_retention"
down_revision: str | Sequence[str] | None = "0006_linearized"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.add_column("tenants", sa.Column("retention_policy", _json(), nullable=True))
    op.add_column("unlearning_jobs", sa.Column("data_deletion", _json(), nullable=True))
    op.add_column("unlearning_jobs", sa.Column("retention_state", sa.String(16), nullable=True))
    op.create_index("ix_unlearning_jobs_retention_state", "unlearning_jobs", ["retention_state"])
    for table in ("datasets", "model_versions"):
        op.add_column(table, sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        op.add_column(table, sa.Column("deleted_by", sa.String(200), nullable=True))
        op.add_column(table, sa.Column("deletion_reason", sa.Text(), nullable=True))
    op.add_column(
        "model_versions", sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("model_versions", sa.Column("kept_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("model_versions", sa.Column("kept_by", sa.String(200), nullable=True))
    op.add_column("model_versions", sa.Column("kept_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        for column in ("kept_reason", "kept_by", "kept_at", "superseded_at"):
            batch.drop_column(column)
    for table in ("datasets", "model_versions"):
        with op.batch_alter_table(table) as batch:
            for column in ("deletion_reason", "deleted_by", "deleted_at"):
                batch.drop_column(column)
    op.drop_index("ix_unlearning_jobs_retention_state", table_name="unlearning_jobs")
    with op.batch_alter_table("unlearning_jobs") as batch:
        batch.drop_column("retention_state")
        batch.drop_column("data_deletion")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("retention_policy")
