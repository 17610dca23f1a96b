"""What a tenant uses, for its quotas: active jobs, recent job steps, stored bytes. Scoped to
one tenant, as every repository in app.db.repositories."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.db.models import (
    TERMINAL_STATES,
    Dataset,
    JobStep,
    ModelVersion,
    StepState,
    Tenant,
    UnlearningJob,
)


@dataclass(frozen=True)
class StepSpan:
    """When a step's latest attempt ran: from `started` to `ended`, or still running (its
    lease says until when at the latest)."""

    started: datetime
    ended: datetime | None
    running_until: datetime | None


class UsageRepository:
    def __init__(self, session: Session, tenant_id: uuid.UUID) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def lock_tenant(self) -> Tenant | None:
        """The tenant's row, locked until the transaction ends: a tenant's submissions are
        counted against its quotas one at a time, so concurrent ones cannot all slip in."""
        # NO KEY UPDATE: rows that merely reference the tenant (FOR KEY SHARE) do not wait.
        stmt = select(Tenant).where(Tenant.id == self.tenant_id).with_for_update(key_share=True)
        return self.session.scalars(stmt).one_or_none()

    def active_jobs(self) -> int:
        """The tenant's jobs that have not ended (QUEUED, RUNNING, CANCELLING)."""
        stmt = select(func.count()).where(
            UnlearningJob.tenant_id == self.tenant_id,
            UnlearningJob.state.not_in(list(TERMINAL_STATES)),
        )
        return self.session.scalar(stmt.select_from(UnlearningJob)) or 0

    def steps_since(self, since: datetime) -> list[StepSpan]:
        """The tenant's steps that ran at some time after `since` (or are running)."""
        stmt = select(
            JobStep.started_at, JobStep.finished_at, JobStep.state, JobStep.lease_expires_at
        ).where(
            JobStep.tenant_id == self.tenant_id,
            JobStep.started_at.is_not(None),
            or_(JobStep.finished_at.is_(None), JobStep.finished_at > since),
        )
        spans = []
        for started, finished, state, lease in self.session.execute(stmt):
            if finished is None and state is not StepState.RUNNING:
                continue  # waiting to be sent again: not running now
            spans.append(StepSpan(started, finished, lease if finished is None else None))
        return spans

    def stored_bytes(self) -> int:
        """Bytes the service stores for the tenant: its uploaded data sets' files and the
        model versions its jobs produced (registered weights are the tenant's own storage)."""
        datasets = select(func.coalesce(func.sum(Dataset.stored_bytes), 0)).where(
            Dataset.tenant_id == self.tenant_id
        )
        versions = select(func.coalesce(func.sum(ModelVersion.size_bytes), 0)).where(
            ModelVersion.tenant_id == self.tenant_id,
            ModelVersion.produced_by_job_id.is_not(None),
        )
        return int(self.session.scalar(datasets) or 0) + int(self.session.scalar(versions) or 0)
