"""/v1/webhook-endpoints, /v1/webhook-signing-secret and a job's webhook deliveries.

Managing webhooks takes the admin scope: an endpoint receives every job's outcome, and the
secrets are credentials. A job's delivery log is part of the job (jobs:read).
"""

from __future__ import annotations

import functools
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from app.api.common import AUTH_ERRORS, PagingDep, SettingsDep, errors
from app.auth import Principal, require
from app.db.models import (
    DeliveryState,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
    WebhookSigningSecret,
)
from app.db.webhook_repositories import WebhookDeliveryRepository, WebhookEndpointRepository
from app.dependencies import DbSession
from app.schemas.common import ListResponse
from app.schemas.webhooks import (
    DeliveryAttemptOut,
    SigningSecretOut,
    WebhookDeliveryOut,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointOut,
    WebhookMessage,
)
from app.services import job_states, webhook_delivery, webhook_endpoints

router = APIRouter(tags=["webhooks"])

Admin = Annotated[Principal, Depends(require("admin"))]
Reader = Annotated[Principal, Depends(require("jobs:read"))]

ENDPOINTS = "/v1/webhook-endpoints"
SIGNING_SECRET = "/v1/webhook-signing-secret"


def endpoint_out(endpoint: WebhookEndpoint) -> WebhookEndpointOut:
    return WebhookEndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        description=endpoint.description,
        created_at=endpoint.created_at,
    )


def delivery_out(
    delivery: WebhookDelivery, attempts: list[WebhookDeliveryAttempt]
) -> WebhookDeliveryOut:
    pending = delivery.state is DeliveryState.PENDING
    return WebhookDeliveryOut(
        id=delivery.id,
        webhook_id=webhook_delivery.webhook_id(delivery.id),
        job_id=delivery.job_id,
        endpoint_id=delivery.endpoint_id,
        url=delivery.url,
        event_type=delivery.event_type,
        state=delivery.state,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at if pending else None,
        created_at=delivery.created_at,
        delivered_at=delivery.delivered_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        attempt_log=[
            DeliveryAttemptOut(
                attempt=a.attempt,
                at=a.started_at,
                status_code=a.status_code,
                error=a.error,
                duration_ms=a.duration_ms,
            )
            for a in attempts
        ],
        payload=WebhookMessage.model_validate(delivery.payload),
    )


@router.post(
    ENDPOINTS,
    status_code=201,
    response_model=WebhookEndpointCreated,
    responses={
        201: {"description": "Created; the response holds the endpoint's secret, only once."},
        **errors(*AUTH_ERRORS, 413, 422),
    },
    summary="Register a webhook endpoint",
)
def create_endpoint(
    body: WebhookEndpointCreate,
    principal: Admin,
    session: DbSession,
    settings: SettingsDep,
    response: Response,
) -> WebhookEndpointCreated:
    """The URL receives a signed POST whenever one of the tenant's jobs ends (SUCCEEDED, FAILED
    or CANCELLED). A URL whose host resolves to a private, loopback, link-local, multicast,
    reserved or unspecified address is refused (422 naming `url`)."""
    endpoint = webhook_endpoints.create_endpoint(
        session, principal, str(body.url), body.description, settings
    )
    response.headers["Location"] = f"{ENDPOINTS}/{endpoint.id}"
    return WebhookEndpointCreated(**endpoint_out(endpoint).model_dump(), secret=endpoint.secret)


@router.get(
    ENDPOINTS,
    response_model=ListResponse[WebhookEndpointOut],
    responses=errors(*AUTH_ERRORS, 422),
    summary="List webhook endpoints, newest first",
)
def list_endpoints(
    principal: Admin, session: DbSession, paging: PagingDep
) -> ListResponse[WebhookEndpointOut]:
    page = paging.page(WebhookEndpointRepository(session, principal.tenant_id).page)
    return ListResponse(
        items=[endpoint_out(e) for e in page.items], next_page_token=page.next_page_token
    )


@router.get(
    ENDPOINTS + "/{endpoint_id}",
    response_model=WebhookEndpointOut,
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="Get a webhook endpoint (without its secret)",
)
def get_endpoint(
    endpoint_id: uuid.UUID, principal: Admin, session: DbSession
) -> WebhookEndpointOut:
    return endpoint_out(webhook_endpoints.get_endpoint(session, principal.tenant_id, endpoint_id))


@router.delete(
    ENDPOINTS + "/{endpoint_id}",
    status_code=204,
    response_class=Response,
    responses={204: {"description": "Deleted."}, **errors(*AUTH_ERRORS, 404, 422)},
    summary="Delete a webhook endpoint",
)
def delete_endpoint(endpoint_id: uuid.UUID, principal: Admin, session: DbSession) -> Response:
    """It receives nothing more; its deliveries still waiting to be sent are given up. Its
    delivery log stays readable through the jobs' webhook-deliveries."""
    webhook_endpoints.delete_endpoint(session, principal, endpoint_id)
    return Response(status_code=204)


@router.get(
    ENDPOINTS + "/{endpoint_id}/deliveries",
    response_model=ListResponse[WebhookDeliveryOut],
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="An endpoint's deliveries and their attempts, newest first",
)
def list_endpoint_deliveries(
    endpoint_id: uuid.UUID, principal: Admin, session: DbSession, paging: PagingDep
) -> ListResponse[WebhookDeliveryOut]:
    endpoint = webhook_endpoints.get_endpoint(session, principal.tenant_id, endpoint_id)
    deliveries = WebhookDeliveryRepository(session, principal.tenant_id)
    page = paging.page(functools.partial(deliveries.page_for_endpoint, endpoint.id))
    pairs = webhook_delivery.deliveries_with_attempts(session, principal.tenant_id, page.items)
    return ListResponse(
        items=[delivery_out(d, a) for d, a in pairs], next_page_token=page.next_page_token
    )


@router.get(
    "/v1/unlearning-jobs/{job_id}/webhook-deliveries",
    response_model=ListResponse[WebhookDeliveryOut],
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="A job's webhook deliveries and their attempts",
    tags=["unlearning jobs"],
)
def list_job_deliveries(
    job_id: uuid.UUID, principal: Reader, session: DbSession
) -> ListResponse[WebhookDeliveryOut]:
    """One delivery per target (the job's webhook_url, each endpoint) once the job has ended,
    each with its attempt log: when, the HTTP status or the error, and how long it took."""
    job = job_states.get_job(session, principal.tenant_id, job_id)
    deliveries = WebhookDeliveryRepository(session, principal.tenant_id).for_job(job.id)
    pairs = webhook_delivery.deliveries_with_attempts(session, principal.tenant_id, deliveries)
    return ListResponse(items=[delivery_out(d, a) for d, a in pairs])


@router.get(
    SIGNING_SECRET,
    response_model=SigningSecretOut,
    responses=errors(*AUTH_ERRORS),
    summary="The secret that signs deliveries to jobs' own webhook_url",
)
def get_signing_secret(principal: Admin, session: DbSession) -> SigningSecretOut:
    """Messages to the webhook_url given with a job are signed with this tenant-wide secret
    (made on first use). Endpoints registered under /v1/webhook-endpoints have their own."""
    return _secret_out(
        webhook_endpoints.signing_secret(session, principal.tenant_id, principal.actor)
    )


@router.post(
    SIGNING_SECRET + ":rotate",
    response_model=SigningSecretOut,
    responses=errors(*AUTH_ERRORS),
    summary="Replace the signing secret",
)
def rotate_signing_secret(
    principal: Admin, session: DbSession, settings: SettingsDep
) -> SigningSecretOut:
    """A new secret signs from now on; the previous one adds a second signature until
    previous_secret_expires_at, so receivers can switch without losing a message."""
    return _secret_out(webhook_endpoints.rotate_signing_secret(session, principal, settings))


def _secret_out(row: WebhookSigningSecret) -> SigningSecretOut:
    return SigningSecretOut(
        secret=row.secret,
        created_at=row.created_at,
        previous_secret_expires_at=row.previous_expires_at,
    )
