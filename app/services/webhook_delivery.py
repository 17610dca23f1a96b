"""Webhook delivery: the deliverer's attempts at the outbox's rows (app.services.webhook_outbox),
and the log of attempts the API shows.

The deliverer (worker.webhooks, run by the watchdog) claims a due row in a short transaction
(`claim_next`: SKIP LOCKED, and the row's next_attempt_at moves past the attempt's end, so no
other deliverer takes it meanwhile), sends it with no transaction open, and records the
outcome (`record_attempt`): delivered on a 2xx, else retried with exponential backoff until
`webhook_max_attempts`. The webhook-id is the row's id, the same on every retry,
so receivers can drop duplicates (a deliverer that dies after sending causes one).

Functions here change rows and never commit, like every service.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import DeliveryState, WebhookDelivery, WebhookDeliveryAttempt
from app.db.webhook_repositories import DeliveryOutbox, WebhookDeliveryRepository
from app.services.webhook_endpoints import signing_secret
from app.settings import Settings

DELIVERER = "webhooks"


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


# ---- the log, as the API shows it --------------------------------------------------------------


def deliveries_with_attempts(
    session: Session, tenant_id: uuid.UUID, deliveries: list[WebhookDelivery]
) -> list[tuple[WebhookDelivery, list[WebhookDeliveryAttempt]]]:
    attempts = WebhookDeliveryRepository(session, tenant_id).attempts([d.id for d in deliveries])
    return [(d, attempts.get(d.id, [])) for d in deliveries]
