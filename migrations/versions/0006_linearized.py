"""Model versions record their fine-tuning mode: standard, or linear (a linearized checkpoint).

Revision ID: 0006_linearized
Revises: 0005_datapath
Create Date: 2026-12-01 23:50:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_linearized"
down_revision: str | Sequence[str] | None = "0005_datapath"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every version made before this revision was made by standard fine-tuning.
    op.add_column(
        "model_versions",
        sa.Column("finetuning", sa.String(16), nullable=False, server_default="standard"),
    )


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("finetuning")
