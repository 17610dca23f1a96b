"""Stored job results in the one shape of app.schemas.results.JobResult: the new version as
`model` ({model_id, version, version_id, weights_sha256}) and the metrics as
`metrics` ({before, after}), without the copies `model_version`, `metrics_before` and
`metrics_after` that results carried beside them.

Revision ID: 0011_job_result
Revises: 0010_device_usage
Create Date: 2026-12-03 14:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011_job_result"
down_revision: str | Sequence[str] | None = "0010_device_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COPIES = ("model_version", "metrics_before", "metrics_after")

jobs = sa.table(
    "unlearning_jobs",
    sa.column("id", sa.Uuid),
    sa.column("model_id", sa.Uuid),
    sa.column("result", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
)
versions = sa.table(
    "model_versions",
    sa.column("id", sa.Uuid),
    sa.column("model_id", sa.Uuid),
    sa.column("version", sa.Integer),
    sa.column("weights_sha256", sa.String),
)


def _results(connection: sa.Connection) -> list[tuple]:
    rows = connection.execute(
        sa.select(jobs.c.id, jobs.c.model_id, jobs.c.result).where(jobs.c.result.is_not(None))
    )
    return [row for row in rows if isinstance(row.result, dict)]


def _stored_version(connection: sa.Connection, model_id, number: int) -> dict | None:  # type: ignore[no-untyped-def]
    row = connection.execute(
        sa.select(versions.c.id, versions.c.weights_sha256).where(
            versions.c.model_id == model_id, versions.c.version == number
        )
    ).one_or_none()
    if row is None:
        return None
    return {"model_id": str(model_id), "version": number, "version_id": str(row.id),
            "weights_sha256": row.weights_sha256}  # fmt: skip


def upgrade() -> None:
    connection = op.get_bind()
    for job_id, model_id, result in _results(connection):
        if not any(name in result for name in COPIES):
            continue
        updated = {k: v for k, v in result.items() if k not in COPIES}
        if "model" not in result and result.get("model_version") is not None:
            updated["model"] = _stored_version(connection, model_id, result["model_version"])
        if "metrics" not in result and "metrics_before" in result:
            updated["metrics"] = {
                "before": result.get("metrics_before") or {},
                "after": result.get("metrics_after") or {},
            }
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(result=updated))


def downgrade() -> None:
    connection = op.get_bind()
    for job_id, _model_id, result in _results(connection):
        model, metrics = result.get("model"), result.get("metrics")
        updated = dict(result)
        if "model" in result:
            updated["model_version"] = model["version"] if model else None
        if isinstance(metrics, dict):
            updated["metrics_before"] = metrics.get("before")
            updated["metrics_after"] = metrics.get("after")
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(result=updated))
