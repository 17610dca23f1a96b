"""The webhook outbox: a job's end, written down as the messages to send.

Where messages go when a job ends (SUCCEEDED, FAILED or CANCELLED):
- the job's own `webhook_url`, signed with the tenant's signing secret;
- every webhook endpoint of the tenant, each signed with the endpoint's own secret
  (both: app.services.webhook_endpoints).

Reliability is an outbox: `enqueue_terminal` inserts one webhook_deliveries row per target in
the transaction that ends the job, so a rolled-back end sends nothing and a committed one is
never forgotten; app.services.webhook_delivery sends them.

Functions here change rows and never commit, like every service.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from app.db.base import new_id
from app.db.models import DeliveryState, JobState, UnlearningJob, WebhookDelivery
from app.db.webhook_repositories import WebhookDeliveryRepository, WebhookEndpointRepository
from app.schemas.results import JobResult
from app.schemas.webhooks import WebhookJobData, WebhookJobResult, WebhookMessage, WebhookVerdict
from app.services.webhook_endpoints import signing_secret

EVENT_TYPES = {
    JobState.SUCCEEDED: "unlearning_job.succeeded",
    JobState.FAILED: "unlearning_job.failed",
    JobState.CANCELLED: "unlearning_job.cancelled",
}
# A job that ran to the end without meeting its target is not a success, and a receiver that
# only looks at the type must not take it for one.
TARGET_NOT_MET = "unlearning_job.target_not_met"


def event_type(job: UnlearningJob) -> str:
    """The message type of `job`'s end: by state, and target_not_met for a SUCCEEDED job
    whose verdict is not met."""
    result = JobResult.of(job.result)
    judged = result is not None and result.verdict is not None
    if job.state is JobState.SUCCEEDED and judged and not result.met:
        return TARGET_NOT_MET
    return EVENT_TYPES[job.state]


def event_payload(job: UnlearningJob, at: datetime) -> dict[str, Any]:
    """The message: {type, timestamp, data: {id, state, verdict, result or error, links}}."""
    base = f"/v1/unlearning-jobs/{job.id}"
    result = JobResult.of(job.result)
    verdict = result.verdict if result else None
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    data = WebhookJobData(
        id=job.id,
        state=job.state,
        subject_reference=job.subject_reference,
        finished_at=job.finished_at,
        # met and reason up front; the checks and the target are in data.result.verdict.
        verdict=WebhookVerdict(met=verdict.met, reason=verdict.reason) if verdict else None,
        result=WebhookJobResult.of(result) if result else None,
        error=error,
        links={"self": base, "report": f"{base}/report", "events": f"{base}/events"},
    )
    # As JSON: what is stored is exactly what is sent.
    message = WebhookMessage(type=event_type(job), timestamp=at, data=data)
    return message.model_dump(mode="json", by_alias=True)


def enqueue_terminal(
    session: Session, job: UnlearningJob, actor: str, at: datetime
) -> list[WebhookDelivery]:
    """One delivery per target of `job`'s end, in the caller's transaction (the outbox)."""
    if job.state not in EVENT_TYPES:
        return []
    targets: list[tuple[uuid.UUID | None, str]] = []
    if job.webhook_url:
        signing_secret(session, job.tenant_id, actor)  # exists before anything is signed
        targets.append((None, job.webhook_url))
    targets += [(e.id, e.url) for e in WebhookEndpointRepository(session, job.tenant_id).active()]
    if not targets:
        return []
    payload = event_payload(job, at)
    repo = WebhookDeliveryRepository(session, job.tenant_id)
    return [
        repo.add(
            WebhookDelivery(
                id=new_id(),
                job_id=job.id,
                endpoint_id=endpoint_id,
                url=url,
                event_type=payload["type"],
                payload=payload,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=at,
                created_at=at,
            )
        )
        for endpoint_id, url in targets
    ]
