"""Workers: job_steps (a lease per step of a job) and the job's current fine-tuning loss.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_steps",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "PENDING",
                "RUNNING",
                "DONE",
                "FAILED",
                "CANCELLED",
                name="step_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "output",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["unlearning_jobs.id"], name=op.f("fk_job_steps_job_id_unlearning_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_job_steps_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("job_id", "name", name=op.f("pk_job_steps")),
    )
    op.create_index(
        "ix_job_steps_state_lease", "job_steps", ["state", "lease_expires_at"], unique=False
    )
    with op.batch_alter_table("unlearning_jobs") as batch:
        batch.add_column(sa.Column("current_loss", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("unlearning_jobs") as batch:
        batch.drop_column("current_loss")
    op.drop_index("ix_job_steps_state_lease", table_name="job_steps")
    op.drop_table("job_steps")
