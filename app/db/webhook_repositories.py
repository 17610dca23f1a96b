"""Queries of webhooks: endpoints, the tenant's signing secret, and the delivery outbox with
its attempt log.

Tenant data is read through repositories scoped to one tenant, as in app.db.repositories.
The one exception, named as such: `DeliveryOutbox`, which the deliverer (run by the
watchdog) uses to claim due deliveries of every tenant, as StepRepository does for steps.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from app.db.models import (
    DeliveryState,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
    WebhookSigningSecret,
)
from app.db.repositories import Page, TenantScoped, newest_first_page


class WebhookEndpointRepository(TenantScoped[WebhookEndpoint]):
    """The tenant's endpoints that have not been deleted."""

    model = WebhookEndpoint

    def _select(self) -> Select:
        return super()._select().where(WebhookEndpoint.deleted_at.is_(None))

    def page(self, page_size: int, page_token: str | None) -> Page[WebhookEndpoint]:
        return newest_first_page(
            self.session, self._select(), WebhookEndpoint, page_size, page_token
        )

    def active(self) -> list[WebhookEndpoint]:
        stmt = self._select().order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        return list(self.session.scalars(stmt))


class SigningSecretRepository:
    """The tenant's one signing secret (for deliveries to jobs' own webhook_url)."""

    def __init__(self, session: Session, tenant_id: uuid.UUID) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def get(self, *, for_update: bool = False) -> WebhookSigningSecret | None:
        stmt = select(WebhookSigningSecret).where(WebhookSigningSecret.tenant_id == self.tenant_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalars(stmt).one_or_none()

    def add(self, row: WebhookSigningSecret) -> WebhookSigningSecret:
        row.tenant_id = self.tenant_id
        self.session.add(row)
        self.session.flush()
        return row


class WebhookDeliveryRepository(TenantScoped[WebhookDelivery]):
    model = WebhookDelivery

    def for_job(self, job_id: uuid.UUID) -> list[WebhookDelivery]:
        stmt = self._select().where(WebhookDelivery.job_id == job_id)
        return list(self.session.scalars(stmt.order_by(WebhookDelivery.created_at)))

    def page_for_endpoint(
        self, endpoint_id: uuid.UUID, page_size: int, page_token: str | None
    ) -> Page[WebhookDelivery]:
        stmt = self._select().where(WebhookDelivery.endpoint_id == endpoint_id)
        return newest_first_page(self.session, stmt, WebhookDelivery, page_size, page_token)

    def give_up_pending_for_endpoint(self, endpoint_id: uuid.UUID, reason: str) -> int:
        stmt = (
            update(WebhookDelivery)
            .where(
                WebhookDelivery.tenant_id == self.tenant_id,
                WebhookDelivery.endpoint_id == endpoint_id,
                WebhookDelivery.state == DeliveryState.PENDING,
            )
            .values(state=DeliveryState.FAILED, last_error=reason)
        )
        return self.session.execute(stmt).rowcount

    def attempts(
        self, delivery_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[WebhookDeliveryAttempt]]:
        """Each delivery's attempts, oldest first."""
        if not delivery_ids:
            return {}
        stmt = (
            select(WebhookDeliveryAttempt)
            .where(
                WebhookDeliveryAttempt.tenant_id == self.tenant_id,
                WebhookDeliveryAttempt.delivery_id.in_(list(delivery_ids)),
            )
            .order_by(WebhookDeliveryAttempt.delivery_id, WebhookDeliveryAttempt.attempt)
        )
        grouped: dict[uuid.UUID, list[WebhookDeliveryAttempt]] = defaultdict(list)
        for row in self.session.scalars(stmt):
            grouped[row.delivery_id].append(row)
        return grouped


class DeliveryOutbox:
    """Due deliveries of every tenant, for the deliverer (not tenant-scoped: see the module's
    docstring). Claims lock with SKIP LOCKED, so concurrent deliverers never wait on, or
    take, the same row."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def claim_due(self, now: datetime) -> WebhookDelivery | None:
        """The most overdue PENDING delivery, locked until the transaction ends."""
        stmt = (
            select(WebhookDelivery)
            .where(
                WebhookDelivery.state == DeliveryState.PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(stmt).one_or_none()

    def lock(self, delivery_id: uuid.UUID) -> WebhookDelivery | None:
        stmt = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update()
        return self.session.scalars(stmt).one_or_none()

    def endpoint(self, endpoint_id: uuid.UUID) -> WebhookEndpoint | None:
        return self.session.get(WebhookEndpoint, endpoint_id)

    def signing_secret(self, tenant_id: uuid.UUID) -> WebhookSigningSecret | None:
        return self.session.get(WebhookSigningSecret, tenant_id)

    def add_attempt(self, attempt: WebhookDeliveryAttempt) -> WebhookDeliveryAttempt:
        self.session.add(attempt)
        self.session.flush()
        return attempt

    def attempt(self, delivery_id: uuid.UUID, number: int) -> WebhookDeliveryAttempt | None:
        stmt = select(WebhookDeliveryAttempt).where(
            WebhookDeliveryAttempt.delivery_id == delivery_id,
            WebhookDeliveryAttempt.attempt == number,
        )
        return self.session.scalars(stmt).one_or_none()
