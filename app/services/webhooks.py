"""Webhooks: a job's end, told to the tenant's URLs, signed as Standard Webhooks says.

Where messages go when a job ends (SUCCEEDED, FAILED or CANCELLED):
- the job's own `webhook_url`, signed with the tenant's signing secret (one per tenant,
  readable and rotatable by its admins; after a rotation the previous secret signs too, as a
  second signature, for `webhook_secret_grace_seconds`);
- every webhook endpoint of the tenant, each signed with the endpoint's own secret (shown
  once, when the endpoint is created).

Reliability is an outbox: `enqueue_terminal` inserts one webhook_deliveries row per target in
the transaction that ends the job, so a rolled-back end sends nothing and a committed one is
never forgotten. The deliverer (worker.webhooks, run by the watchdog) claims a due row in a
short transaction (`claim_next`: SKIP LOCKED, and the row's next_attempt_at moves past the
attempt's end, so no other deliverer takes it meanwhile), sends it with no transaction open,
and records the outcome (`record_attempt`): delivered on a 2xx, else retried with exponential
backoff until `webhook_max_attempts`. The webhook-id is the row's id, the same on every retry,
so receivers can drop duplicates (a deliverer that dies after sending causes one).

Functions here change rows and never commit, like every service.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth import Principal
from app.db.base import new_id, utcnow
from app.db.models import (
    DeliveryState,
    JobState,
    UnlearningJob,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
    WebhookSigningSecret,
)
from app.db.webhook_repositories import (
    DeliveryOutbox,
    SigningSecretRepository,
    WebhookDeliveryRepository,
    WebhookEndpointRepository,
)
from app.errors import InvalidRequest, NotFound
from app.services import audit
from app.settings import Settings
from app.ssrf import UnsafeUrl, vet_url

SECRET_PREFIX = "whsec_"
EVENT_TYPES = {
    JobState.SUCCEEDED: "unlearning_job.succeeded",
    JobState.FAILED: "unlearning_job.failed",
    JobState.CANCELLED: "unlearning_job.cancelled",
}
# A job that ran to the end without meeting its target is not a success, and a receiver that
# only looks at the type must not take it for one.
TARGET_NOT_MET = "unlearning_job.target_not_met"
DELIVERER = "webhooks"


def event_type(job: UnlearningJob) -> str:
    """The message type of `job`'s end: by state, and target_not_met for a SUCCEEDED job
    whose verdict is not met."""
    verdict = (job.result or {}).get("verdict")
    if job.state is JobState.SUCCEEDED and isinstance(verdict, dict) and not verdict.get("met"):
        return TARGET_NOT_MET
    return EVENT_TYPES[job.state]


def generate_secret() -> str:
    """A Standard Webhooks secret: whsec_ and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_url(url: str, field: str, settings: Settings) -> None:
    """422 naming `field` if the service may not call `url` (see app.ssrf)."""
    try:
        vet_url(url, allow_private=settings.webhook_allow_private)
    except UnsafeUrl as exc:
        raise InvalidRequest(field, str(exc)) from None


# ---- endpoints and secrets (the API) ---------------------------------------------------------


def create_endpoint(
    session: Session,
    principal: Principal,
    url: str,
    description: str | None,
    settings: Settings,
) -> WebhookEndpoint:
    """A new endpoint for the caller's tenant; its `secret` is shown to the caller once."""
    check_url(url, "url", settings)
    endpoint = WebhookEndpointRepository(session, principal.tenant_id).add(
        WebhookEndpoint(url=url, description=description, secret=generate_secret())
    )
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="webhook_endpoint.created",
        resource_type="webhook_endpoint",
        resource_id=endpoint.id,
        details={"url": url, "description": description},
    )
    return endpoint


def get_endpoint(session: Session, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = WebhookEndpointRepository(session, tenant_id).get(endpoint_id)
    if endpoint is None:
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    return endpoint


def delete_endpoint(session: Session, principal: Principal, endpoint_id: uuid.UUID) -> None:
    """The endpoint receives nothing more; its deliveries not yet made are given up."""
    endpoint = WebhookEndpointRepository(session, principal.tenant_id).get(
        endpoint_id, for_update=True
    )
    if endpoint is None:
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    endpoint.deleted_at = utcnow()
    dropped = WebhookDeliveryRepository(session, principal.tenant_id).give_up_pending_for_endpoint(
        endpoint.id, "the endpoint was deleted"
    )
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="webhook_endpoint.deleted",
        resource_type="webhook_endpoint",
        resource_id=endpoint.id,
        details={"url": endpoint.url, "pending_deliveries_dropped": dropped},
    )


def signing_secret(session: Session, tenant_id: uuid.UUID, actor: str) -> WebhookSigningSecret:
    """The tenant's signing secret, made on first use."""
    repo = SigningSecretRepository(session, tenant_id)
    row = repo.get()
    if row is not None:
        return row
    try:
        with session.begin_nested():  # two first uses may race to make it
            row = repo.add(WebhookSigningSecret(secret=generate_secret()))
    except IntegrityError:
        return repo.get()  # type: ignore[return-value]
    audit.record(
        session,
        tenant_id=tenant_id,
        actor=actor,
        action="webhook_signing_secret.created",
        resource_type="webhook_signing_secret",
        resource_id=tenant_id,
    )
    return row


def rotate_signing_secret(
    session: Session, principal: Principal, settings: Settings
) -> WebhookSigningSecret:
    """A new signing secret; the current one keeps signing for the grace period."""
    signing_secret(session, principal.tenant_id, principal.actor)
    row = SigningSecretRepository(session, principal.tenant_id).get(for_update=True)
    assert row is not None
    now = utcnow()
    row.previous_secret = row.secret
    row.previous_expires_at = now + timedelta(seconds=settings.webhook_secret_grace_seconds)
    row.secret = generate_secret()
    row.created_at = now
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="webhook_signing_secret.rotated",
        resource_type="webhook_signing_secret",
        resource_id=principal.tenant_id,
        details={"previous_expires_at": row.previous_expires_at.isoformat()},
    )
    return row


def deliveries_with_attempts(
    session: Session, tenant_id: uuid.UUID, deliveries: list[WebhookDelivery]
) -> list[tuple[WebhookDelivery, list[WebhookDeliveryAttempt]]]:
    attempts = WebhookDeliveryRepository(session, tenant_id).attempts([d.id for d in deliveries])
    return [(d, attempts.get(d.id, [])) for d in deliveries]


# ---- the outbox: written when a job ends -----------------------------------------------------


def event_payload(job: UnlearningJob, at: datetime) -> dict[str, Any]:
    """The message: {type, timestamp, data: {id, state, verdict, result or error, links}}."""
    base = f"/v1/unlearning-jobs/{job.id}"
    result = job.result or {}
    summary = (
        {
            "model": result.get("model"),
            "model_version": result.get("model_version"),
            "lambda": result.get("lambda"),
            "kept_fraction": result.get("kept_fraction"),
            "metrics_after": result.get("metrics_after"),
            "verdict": result.get("verdict"),
        }
        if job.result
        else None
    )
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    data = {
        "id": str(job.id),
        "state": job.state.value,
        "subject_reference": job.subject_reference,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "verdict": _verdict_summary(result.get("verdict")),
        "result": summary,
        "error": error,
        "links": {"self": base, "report": f"{base}/report", "events": f"{base}/events"},
    }
    # Round-tripped through JSON: what is stored is exactly what is sent.
    message = {"type": event_type(job), "timestamp": at.isoformat(), "data": data}
    return json.loads(json.dumps(message, default=str))


def _verdict_summary(verdict: Any) -> dict[str, Any] | None:
    """met and reason up front; the checks and the target are in data.result.verdict."""
    if not isinstance(verdict, dict):
        return None
    return {"met": verdict.get("met"), "reason": verdict.get("reason")}


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


# ---- the deliverer's side ----------------------------------------------------------------------


def webhook_id(delivery_id: uuid.UUID) -> str:
    return f"msg_{delivery_id.hex}"


@dataclass(frozen=True)
class ClaimedDelivery:
    """One attempt a deliverer holds: what it sends, and with which secrets it signs."""

    delivery_id: uuid.UUID
    tenant_id: uuid.UUID
    attempt: int
    url: str
    body: str
    secrets: tuple[str, ...]

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.delivery_id)


@dataclass(frozen=True)
class AttemptOutcome:
    status_code: int | None
    error: str | None
    duration_ms: float
    address: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def claim_lease_seconds(settings: Settings) -> float:
    """How long a claimed attempt is left alone: longer than any attempt can take."""
    return 2 * settings.webhook_timeout_seconds + 60


def backoff_seconds(attempts: int, settings: Settings) -> float:
    """The wait after the `attempts`-th failed attempt: base, 2 base, 4 base, ... capped."""
    wait = settings.webhook_retry_base_seconds * 2 ** min(max(attempts - 1, 0), 62)
    return min(wait, settings.webhook_retry_max_seconds)


def claim_next(session: Session, settings: Settings) -> ClaimedDelivery | None:
    """Claim the next due delivery: one more attempt, logged as started, and not due again
    until the claim lapses. None if nothing is due."""
    outbox = DeliveryOutbox(session)
    now = utcnow()
    while (delivery := outbox.claim_due(now)) is not None:
        secrets_ = _secrets(session, outbox, delivery, now)
        if secrets_ is None:
            delivery.state = DeliveryState.FAILED
            delivery.last_error = "the endpoint was deleted"
            continue
        unfinished = outbox.attempt(delivery.id, delivery.attempts)
        if unfinished is not None and unfinished.duration_ms is None:
            # Its claim lapsed with no outcome recorded: say so in the log.
            unfinished.error = "no outcome recorded: the deliverer stopped during the attempt"
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.next_attempt_at = now + timedelta(seconds=claim_lease_seconds(settings))
        outbox.add_attempt(
            WebhookDeliveryAttempt(
                delivery_id=delivery.id,
                tenant_id=delivery.tenant_id,
                attempt=delivery.attempts,
                started_at=now,
            )
        )
        body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True)
        return ClaimedDelivery(
            delivery.id, delivery.tenant_id, delivery.attempts, delivery.url, body, secrets_
        )
    return None


def _secrets(
    session: Session, outbox: DeliveryOutbox, delivery: WebhookDelivery, now: datetime
) -> tuple[str, ...] | None:
    """The secrets that sign `delivery`; None if its endpoint is gone."""
    if delivery.endpoint_id is not None:
        endpoint = outbox.endpoint(delivery.endpoint_id)
        if endpoint is None or endpoint.deleted_at is not None:
            return None
        return (endpoint.secret,)
    row = outbox.signing_secret(delivery.tenant_id) or signing_secret(
        session, delivery.tenant_id, DELIVERER
    )
    if row.previous_secret and row.previous_expires_at and row.previous_expires_at > now:
        return (row.secret, row.previous_secret)
    return (row.secret,)


def record_attempt(
    session: Session, claimed: ClaimedDelivery, outcome: AttemptOutcome, settings: Settings
) -> str:
    """Log the attempt's outcome and decide what follows: "delivered", "retry", "gave_up",
    or "stale" (the claim lapsed and another attempt has started since)."""
    outbox = DeliveryOutbox(session)
    now = utcnow()
    attempt = outbox.attempt(claimed.delivery_id, claimed.attempt)
    if attempt is not None:
        attempt.status_code = outcome.status_code
        attempt.error = outcome.error
        attempt.duration_ms = round(outcome.duration_ms, 2)
        attempt.address = outcome.address
    delivery = outbox.lock(claimed.delivery_id)
    # Compare-and-set: only the holder of the latest attempt moves the delivery on.
    if (
        delivery is None
        or delivery.state is not DeliveryState.PENDING
        or delivery.attempts != claimed.attempt
    ):
        return "stale"
    delivery.last_status_code = outcome.status_code
    delivery.last_error = outcome.error
    if outcome.delivered:
        delivery.state = DeliveryState.SUCCEEDED
        delivery.delivered_at = now
        return "delivered"
    if delivery.attempts >= settings.webhook_max_attempts:
        delivery.state = DeliveryState.FAILED
        return "gave_up"
    delivery.next_attempt_at = now + timedelta(seconds=backoff_seconds(delivery.attempts, settings))
    return "retry"
