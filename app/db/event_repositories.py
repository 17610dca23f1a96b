"""Queries of a job's event stream (SSE): its events after a cursor. Scoped to one tenant, as
every repository in app.db.repositories."""

from __future__ import annotations

import uuid

from app.db.models import JobEvent
from app.db.repositories import TenantScoped


class JobEventRepository(TenantScoped[JobEvent]):
    """A job's events in id order: what a Server-Sent Events stream sends."""

    model = JobEvent

    def after(self, job_id: uuid.UUID, after_id: int, limit: int) -> list[JobEvent]:
        stmt = (
            self._select()
            .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
            .order_by(JobEvent.id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))
