"""Per-tenant quotas: jobs that have not ended, worker seconds per day, stored bytes.

- Active jobs and daily compute are rates: over them, a submission is a 429 with Retry-After
  (a job ending, or old steps leaving the 24-hour window, makes room).
- Stored bytes are a capacity: an upload or a job whose new model version would pass it is a
  413 (deleting data makes room, waiting does not).

Daily compute is measured, not estimated: the wall time of the tenant's job steps (all
workers together) that falls within the last 24 hours, a running step counted up to now (at
most to its lease's end, after which its worker is presumed dead). It gates new jobs; a job
already accepted runs to its end, so a tenant can pass the quota by what its running jobs
still do (bounded by the job size limits and quota_active_jobs). A step that was re-run after
its worker died counts its last attempt only.

Quotas are the settings' (quota_*), unless quota_overrides names the tenant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.auth import Principal
from app.db.base import utcnow
from app.db.models import Tenant
from app.db.usage_repositories import StepSpan, UsageRepository
from app.errors import ApiError, NotFound
from app.settings import Settings

DAY = timedelta(days=1)


class QuotaExceeded(ApiError):
    """429: a rate-like quota is used up; Retry-After says when there may be room."""

    status_code, code = 429, "quota_exceeded"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, retry_after_seconds))}


class StorageQuotaExceeded(ApiError):
    """413: what the tenant stores would pass its quota of bytes."""

    status_code, code = 413, "storage_quota_exceeded"


@dataclass(frozen=True)
class Quota:
    active_jobs: int
    compute_seconds_per_day: float
    stored_bytes: int


def quota_of(tenant: Tenant, settings: Settings) -> Quota:
    """The tenant's quotas: its override's values where given, else the global settings."""
    override = settings.quota_overrides.get(tenant.name) or settings.quota_overrides.get(
        str(tenant.id)
    )

    def pick(name: str, default: float) -> float:
        value = getattr(override, name, None) if override is not None else None
        return default if value is None else value

    return Quota(
        active_jobs=int(pick("active_jobs", settings.quota_active_jobs)),
        compute_seconds_per_day=pick(
            "compute_seconds_per_day", settings.quota_compute_seconds_per_day
        ),
        stored_bytes=int(pick("stored_bytes", settings.quota_stored_bytes)),
    )


def lock_tenant(session: Session, principal: Principal) -> Tenant:
    """The caller's tenant, its row locked until the transaction ends: a tenant's submissions
    are counted against its quotas one after the other, so concurrent ones cannot all pass."""
    tenant = UsageRepository(session, principal.tenant_id).lock_tenant()
    if tenant is None:
        raise NotFound("tenant not found")
    return tenant


def admit_job(session: Session, tenant: Tenant, new_bytes: int, settings: Settings) -> None:
    """Check a new job against the quotas of `tenant` (locked by lock_tenant). `new_bytes`:
    what the job will store (its new model version)."""
    usage = UsageRepository(session, tenant.id)
    quota = quota_of(tenant, settings)

    active = usage.active_jobs()
    if active >= quota.active_jobs:
        raise QuotaExceeded(
            f"active jobs: the tenant has {active} jobs that have not ended, its quota is "
            f"{quota.active_jobs} (NEGMERGE_QUOTA_ACTIVE_JOBS); submit when one has ended",
            settings.retry_after_seconds,
        )

    now = utcnow()
    spans = usage.steps_since(now - DAY)
    used = compute_seconds(spans, now)
    if used >= quota.compute_seconds_per_day:
        wait = seconds_until_below(spans, now, quota.compute_seconds_per_day)
        raise QuotaExceeded(
            f"compute: the tenant's jobs used {used:.0f} worker seconds in the last 24 hours, "
            f"its quota is {quota.compute_seconds_per_day:.0f} "
            "(NEGMERGE_QUOTA_COMPUTE_SECONDS_PER_DAY)",
            wait,
        )
    check_storage(usage, quota, new_bytes, "this job's new model version")


def admit_upload(
    session: Session, principal: Principal, new_bytes: int, settings: Settings
) -> None:
    """Check that storing `new_bytes` more (an upload's files) stays within the quota."""
    tenant = lock_tenant(session, principal)
    usage = UsageRepository(session, tenant.id)
    check_storage(usage, quota_of(tenant, settings), new_bytes, "this upload")


def check_storage(usage: UsageRepository, quota: Quota, new_bytes: int, what: str) -> None:
    stored = usage.stored_bytes()
    if stored + new_bytes > quota.stored_bytes:
        raise StorageQuotaExceeded(
            f"stored bytes: the tenant stores {stored} bytes and {what} needs {new_bytes} more, "
            f"its quota is {quota.stored_bytes} (NEGMERGE_QUOTA_STORED_BYTES); delete data "
            "sets or model versions to make room"
        )


def compute_seconds(spans: list[StepSpan], now: datetime, window: timedelta = DAY) -> float:
    """Seconds of the steps' run time within the `window` that ends `now`."""
    since = now - window
    total = 0.0
    for span in spans:
        end = span.ended or min(now, span.running_until or now)
        start = max(span.started, since)
        total += max(0.0, (min(end, now) - start).total_seconds())
    return total


def seconds_until_below(spans: list[StepSpan], now: datetime, quota: float) -> int:
    """About when the usage in the 24-hour window will be under `quota`, in whole seconds
    from now: the first moment a finished step's end leaves the window at which it is, with
    running steps counted up to their current lease's end. At most a day."""
    ends = sorted({span.ended for span in spans if span.ended is not None})
    for end in ends:
        moment = end + DAY
        if compute_seconds(spans, moment) < quota:
            return math.ceil((moment - now).total_seconds())
    return int(DAY.total_seconds())
