"""The unlearning job's state machine, which the API and the workers drive: its states and
stages, each change recorded as an event and an audit entry, cancelling, and what a job's end
sets off in the same transaction (the webhook outbox, the mark that its data is due for
deletion, its deletion requests' settling).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from app.auth import Principal
from app.db.base import utcnow
from app.db.models import JobEvent, JobStage, JobState, UnlearningJob
from app.db.repositories import JobRepository
from app.errors import Conflict, NotFound, without_reprs
from app.observability import STAGE_SECONDS
from app.schemas.results import JobResult
from app.services import audit, retention, webhook_outbox
from app.services.deletion_requests import settle_requests

# Which state may follow which. The API and the workers (app.services.steps) move a job only
# along these edges, so a late or repeated message cannot bring an ended job back to life.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class InvalidTransition(Conflict):
    pass


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> UnlearningJob:
    job = JobRepository(session, tenant_id).get(job_id)
    if job is None:
        raise NotFound(f"unlearning job {job_id} not found")
    return job


def cancel_job(session: Session, principal: Principal, job_id: uuid.UUID) -> UnlearningJob:
    """Best effort: a QUEUED job is CANCELLED at once; a RUNNING one becomes CANCELLING and
    its worker stops at the next check. Cancelling a cancelling job changes nothing."""
    repo = JobRepository(session, principal.tenant_id)
    job = repo.get(job_id, for_update=True)
    if job is None:
        raise NotFound(f"unlearning job {job_id} not found")
    if job.state is JobState.CANCELLING:
        return job
    if job.state.is_terminal:
        raise Conflict(f"state: the job has already ended ({job.state.value})")
    job.cancel_requested_at = utcnow()
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="job.cancel_requested",
        resource_type="unlearning_job",
        resource_id=job.id,
        details={"state": job.state.value},
    )
    target = JobState.CANCELLED if job.state is JobState.QUEUED else JobState.CANCELLING
    change_state(session, job, target, principal.actor)
    return job


def change_state(
    session: Session,
    job: UnlearningJob,
    state: JobState,
    actor: str,
    *,
    error: tuple[str, str] | None = None,
    result: JobResult | None = None,
) -> None:
    """Move `job` to `state` along an allowed edge, recording the event and the audit entry."""
    if state not in TRANSITIONS[job.state]:
        raise InvalidTransition(f"state: cannot go from {job.state.value} to {state.value}")
    previous, now = job.state, utcnow()
    job.state = state
    job.updated_at = now
    if state is JobState.RUNNING and job.started_at is None:
        job.started_at = now
    if state.is_terminal:
        job.finished_at = now
        if job.stage is not None:
            _observe_stage(session, job, now)
    if error is not None:
        # The one place a job's error text is written: what every reader of it shows.
        job.error_code, job.error_message = error[0], without_reprs(error[1])
    if result is not None:
        job.result = result.to_json()
    details: dict[str, Any] = {"from": previous.value, "to": state.value}
    if error is not None:
        details["error_code"] = error[0]
    if result is not None and result.verdict is not None:
        # The end's event (SSE, timeline, audit) says the outcome.
        details["verdict"] = {"met": result.verdict.met, "reason": result.verdict.reason}
    JobRepository(session, job.tenant_id).add_event(
        JobEvent(job_id=job.id, kind="state", state=state, stage=job.stage, details=details, at=now)
    )
    if state.is_terminal:
        # A finished job is in no stage; its end's event keeps the stage it ended in (where
        # a FAILED job broke).
        job.stage = None
    entry = audit.record(
        session,
        tenant_id=job.tenant_id,
        actor=actor,
        action="job.state_changed",
        resource_type="unlearning_job",
        resource_id=job.id,
        details=details,
    )
    if state.is_terminal:
        # The chain's head at completion, which the report cites.
        job.audit_seq_at_end, job.audit_head_at_end = entry.seq, entry.hash
        # The outbox: the webhooks are committed (or rolled back) with the job's end, and
        # so is the mark that its data is due for deletion (worker.retention).
        webhook_outbox.enqueue_terminal(session, job, actor, now)
        retention.job_ended(job)
        settle_requests(session, job, actor, now)


def change_stage(session: Session, job: UnlearningJob, stage: JobStage, actor: str) -> None:
    """Enter `stage` (workers call this); the time spent in the previous one is measured."""
    now = utcnow()
    if job.stage is not None:
        _observe_stage(session, job, now)
    job.stage = stage
    job.updated_at = now
    JobRepository(session, job.tenant_id).add_event(
        JobEvent(job_id=job.id, kind="stage", state=job.state, stage=stage, details={}, at=now)
    )
    audit.record(
        session,
        tenant_id=job.tenant_id,
        actor=actor,
        action="job.stage_changed",
        resource_type="unlearning_job",
        resource_id=job.id,
        details={"stage": stage.value},
    )


def _observe_stage(session: Session, job: UnlearningJob, now) -> None:  # type: ignore[no-untyped-def]
    started = next(
        (
            e.at
            for e in reversed(JobRepository(session, job.tenant_id).events(job.id))
            if e.kind == "stage" and e.stage == job.stage
        ),
        None,
    )
    if started is not None and job.stage is not None:
        STAGE_SECONDS.labels(job.stage.value).observe((now - started).total_seconds())
