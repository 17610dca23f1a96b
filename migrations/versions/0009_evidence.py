"""Evidence: the audit chain's head when a job ended, and the base model's sha256 in stored
results made the materialised weights' (the version's), as reports and the job resource show.

Revision ID: 0009_evidence
Revises: 0006_linearized
Create Date: 2026-12-02 03:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009_evidence"
down_revision: str | Sequence[str] | None = "0008_deletion_requests"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

jobs = sa.table(
    "unlearning_jobs",
    sa.column("id", sa.Uuid),
    sa.column("model_version_id", sa.Uuid),
    sa.column("result", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
)
versions = sa.table(
    "model_versions", sa.column("id", sa.Uuid), sa.column("weights_sha256", sa.String)
)


def upgrade() -> None:
    op.add_column(
        "unlearning_jobs",
        sa.Column("audit_seq_at_end", sa.BigInteger().with_variant(sa.Integer, "sqlite")),
    )
    op.add_column("unlearning_jobs", sa.Column("audit_head_at_end", sa.String(64)))
    # Results stored base_model_sha256 = the worker's re-serialised working copy of the base;
    # it is kept as base_copy_sha256 and base_model_sha256 becomes the version's weights'.
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(jobs.c.id, jobs.c.result, versions.c.weights_sha256)
        .join(versions, versions.c.id == jobs.c.model_version_id)
        .where(jobs.c.result.is_not(None))
    )
    for job_id, result, weights_sha256 in list(rows):
        if not isinstance(result, dict) or "base_copy_sha256" in result:
            continue
        copy = result.get("base_model_sha256")
        updated = {**result, "base_model_sha256": weights_sha256, "base_copy_sha256": copy}
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(result=updated))


def downgrade() -> None:
    with op.batch_alter_table("unlearning_jobs") as batch:
        batch.drop_column("audit_head_at_end")
        batch.drop_column("audit_seq_at_end")
