"""Jobs: the accelerator use (memory, utilisation) of the latest fine-tuning step reported.

Revision ID: 0010_device_usage
Revises: 0006_linearized
Create Date: 2026-12-02 03:50:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010_device_usage"
down_revision: str | Sequence[str] | None = "0009_evidence"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "unlearning_jobs",
        sa.Column(
            "current_device_usage",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("unlearning_jobs") as batch:
        batch.drop_column("current_device_usage")
