"""Quotas: the bytes an uploaded data set stores, and an index for a tenant's recent steps.

Revision ID: 0004_sec_bounds
Revises: 0003
Create Date: 2026-12-01 20:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_sec_bounds"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Uploads made before this revision have no recorded size: they count as 0 bytes.
    op.add_column("datasets", sa.Column("stored_bytes", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_job_steps_tenant_finished", "job_steps", ["tenant_id", "finished_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_job_steps_tenant_finished", table_name="job_steps")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("stored_bytes")
