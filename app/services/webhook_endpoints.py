"""Webhook endpoints and signing secrets: the tenant's URLs that hear of a job's end, and the
keys its messages are signed with, as Standard Webhooks says.

- A job's own `webhook_url` is signed with the tenant's signing secret (one per tenant,
  readable and rotatable by its admins; after a rotation the previous secret signs too, as a
  second signature, for `webhook_secret_grace_seconds`);
- every webhook endpoint of the tenant is signed with the endpoint's own secret (shown once,
  when the endpoint is created).

Functions here change rows and never commit, like every service.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth import Principal
from app.db.base import utcnow
from app.db.models import WebhookEndpoint, WebhookSigningSecret
from app.db.webhook_repositories import (
    SigningSecretRepository,
    WebhookDeliveryRepository,
    WebhookEndpointRepository,
)
from app.errors import InvalidRequest, NotFound
from app.services import audit
from app.settings import Settings
from app.ssrf import UnsafeUrl, vet_url

SECRET_PREFIX = "whsec_"


def generate_secret() -> str:
    """A Standard Webhooks secret: whsec_ and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_url(url: str, field: str, settings: Settings) -> None:
    """422 naming `field` if the service may not call `url` (see app.ssrf)."""
    try:
        vet_url(url, allow_private=settings.webhook_allow_private)
    except UnsafeUrl as exc:
        raise InvalidRequest(field, str(exc)) from None


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
