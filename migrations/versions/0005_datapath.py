"""Jobs: the training images per second of the latest fine-tuning step a worker reported.

Revision ID: 0005_datapath
Revises: 0004_sec_bounds
Create Date: 2026-12-01 23:50:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_datapath"
down_revision: str | Sequence[str] | None = "0004_sec_bounds"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "unlearning_jobs", sa.Column("current_images_per_second", sa.Double(), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("unlearning_jobs") as batch:
        batch.drop_column("current_images_per_second")
