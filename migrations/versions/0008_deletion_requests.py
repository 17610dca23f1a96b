"""Per-subject deletion requests, the samples they forget, and each model's batching policy.

Revision ID: 0008_deletion_requests
Revises: 0006_linearized
Create Date: 2026-12-02 03:15:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_deletion_requests"
down_revision: str | Sequence[str] | None = "0007_retention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
STATES = ("PENDING", "BATCHED", "FORGOTTEN", "NOT_FORGOTTEN", "FAILED", "CANCELLED")


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(table: str, column: str, referred: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{referred}.id"], name=op.f(f"fk_{table}_{column}_{referred}")
    )


def upgrade() -> None:
    op.create_table(
        "deletion_requests",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("subject_reference", sa.String(length=200), nullable=False),
        sa.Column("legal_basis", sa.String(length=200), nullable=True),
        sa.Column("ids", JSON, nullable=True),
        sa.Column("classes", JSON, nullable=True),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                *STATES,
                name="deletion_request_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        _time("received_at"),
        _time("due_at"),
        sa.Column("created_by_key_id", sa.Uuid(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Uuid(), nullable=True),
        sa.Column("evidence", JSON, nullable=True),
        _time("created_at"),
        _time("updated_at"),
        _time("finished_at", nullable=True),
        _fk("deletion_requests", "tenant_id", "tenants"),
        _fk("deletion_requests", "model_id", "models"),
        _fk("deletion_requests", "dataset_id", "datasets"),
        _fk("deletion_requests", "created_by_key_id", "api_keys"),
        _fk("deletion_requests", "job_id", "unlearning_jobs"),
        _fk("deletion_requests", "model_version_id", "model_versions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_requests")),
    )
    op.create_index(
        "ix_deletion_requests_tenant_created",
        "deletion_requests",
        ["tenant_id", "created_at", "id"],
    )
    op.create_index("ix_deletion_requests_model_state", "deletion_requests", ["model_id", "state"])
    for column in ("subject_reference", "job_id", "model_version_id"):
        op.create_index(
            op.f(f"ix_deletion_requests_{column}"), "deletion_requests", [column], unique=False
        )
    op.create_table(
        "deletion_request_samples",
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("sample_key", sa.String(length=80), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["deletion_requests.id"],
            name=op.f("fk_deletion_request_samples_request_id_deletion_requests"),
        ),
        _fk("deletion_request_samples", "tenant_id", "tenants"),
        _fk("deletion_request_samples", "model_id", "models"),
        sa.PrimaryKeyConstraint(
            "request_id", "sample_key", name=op.f("pk_deletion_request_samples")
        ),
    )
    op.create_index(
        "ix_deletion_request_samples_model_key",
        "deletion_request_samples",
        ["model_id", "sample_key"],
    )
    op.create_table(
        "deletion_policies",
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=True),
        sa.Column("window_seconds", sa.Integer(), nullable=True),
        sa.Column("job_template", JSON, nullable=False),
        sa.Column("updated_by_key_id", sa.Uuid(), nullable=False),
        sa.Column("last_batch_error", sa.Text(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        _fk("deletion_policies", "model_id", "models"),
        _fk("deletion_policies", "tenant_id", "tenants"),
        _fk("deletion_policies", "updated_by_key_id", "api_keys"),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_deletion_policies")),
    )
    op.create_index(
        op.f("ix_deletion_policies_tenant_id"), "deletion_policies", ["tenant_id"], unique=False
    )


def downgrade() -> None:
    op.drop_table("deletion_policies")
    op.drop_table("deletion_request_samples")
    op.drop_table("deletion_requests")
