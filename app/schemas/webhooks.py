"""Webhook endpoints, the signing secret, the messages and their delivery log."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from app.db.models import DeliveryState, JobState
from app.schemas.common import Strict
from app.schemas.results import JobResult, StoredVersion
from negmerge.verdict import Verdict

SECRET_DESCRIPTION = (
    "The Standard Webhooks signing secret (whsec_ and base64): verify each message with it, "
    "e.g. standardwebhooks.Webhook(secret).verify(body, headers)."
)


class WebhookEndpointCreate(Strict):
    url: AnyHttpUrl = Field(
        description="Receives a POST when any of the tenant's jobs ends. Its host must resolve "
        "to public addresses only.",
        examples=["https://hooks.example.com/negmerge"],
    )
    description: str | None = Field(None, max_length=200, examples=["compliance ticketing"])


class WebhookEndpointOut(BaseModel):
    id: uuid.UUID
    url: str
    description: str | None = None
    created_at: datetime


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(
        description=SECRET_DESCRIPTION + " Shown only in this response.",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class SigningSecretOut(BaseModel):
    """The secret that signs deliveries to jobs' own webhook_url."""

    secret: str = Field(description=SECRET_DESCRIPTION)
    created_at: datetime
    previous_secret_expires_at: datetime | None = Field(
        None,
        description="After a rotation, messages carry a second signature made with the "
        "previous secret until this time.",
    )


class WebhookJobResult(BaseModel):
    """The job's result in brief (GET the job for all of it: app.schemas.results.JobResult)."""

    model_config = ConfigDict(populate_by_name=True)

    model: StoredVersion | None = Field(None, description="The new version; none at lambda 0.")
    model_version: int | None = Field(None, description="model.version, for receivers' ease.")
    lambda_: float | None = Field(None, alias="lambda")
    kept_fraction: float | None = None
    metrics_after: dict[str, float | None] | None = Field(
        None, description="The unlearned model's metrics (the job's result.metrics.after)."
    )
    verdict: Verdict | None = None

    @classmethod
    def of(cls, result: JobResult) -> WebhookJobResult:
        return cls(
            model=result.model,
            model_version=result.model.version if result.model else None,
            lambda_=result.lambda_,
            kept_fraction=result.kept_fraction,
            metrics_after=result.metrics.after if result.metrics else None,
            verdict=result.verdict,
        )


class WebhookVerdict(BaseModel):
    met: bool = Field(description="False: the job ran to the end but did not forget as asked.")
    reason: str = Field(description="What was met, or what was not (the numbers and bounds).")


class WebhookJobData(BaseModel):
    id: uuid.UUID
    state: JobState
    subject_reference: str | None = None
    finished_at: datetime | None = None
    verdict: WebhookVerdict | None = Field(None, description="SUCCEEDED only.")
    result: WebhookJobResult | None = Field(None, description="Summary; SUCCEEDED only.")
    error: dict[str, str] | None = Field(None, description="{code, message}; FAILED only.")
    links: dict[str, str] = Field(description="self, report and events (paths under the API).")


class WebhookMessage(BaseModel):
    """The JSON body POSTed to a webhook, signed with the headers webhook-id (the same on
    every retry), webhook-timestamp and webhook-signature (Standard Webhooks)."""

    type: str = Field(
        examples=["unlearning_job.succeeded"],
        description="unlearning_job.succeeded (target met), unlearning_job.target_not_met "
        "(SUCCEEDED, but the target was not met), unlearning_job.failed or "
        "unlearning_job.cancelled",
    )
    timestamp: datetime = Field(description="When the job ended.")
    data: WebhookJobData


class DeliveryAttemptOut(BaseModel):
    attempt: int = Field(examples=[1])
    at: datetime = Field(description="When the attempt started.")
    status_code: int | None = Field(None, description="The receiver's HTTP status, if any.")
    error: str | None = Field(
        None, description="Why it failed (timeout, refused address, HTTP status)."
    )
    duration_ms: float | None = Field(None, description="Absent while the attempt is running.")


class WebhookDeliveryOut(BaseModel):
    id: uuid.UUID
    webhook_id: str = Field(description="The webhook-id header: the same on every attempt.")
    job_id: uuid.UUID
    endpoint_id: uuid.UUID | None = Field(
        None, description="The endpoint; absent for the job's own webhook_url."
    )
    url: str
    event_type: str
    state: DeliveryState = Field(
        description="PENDING (to be sent or retried), SUCCEEDED (a 2xx answer) or FAILED "
        "(given up after the last attempt, or its endpoint was deleted)."
    )
    attempts: int
    next_attempt_at: datetime | None = Field(None, description="When it is due (PENDING only).")
    created_at: datetime
    delivered_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    attempt_log: list[DeliveryAttemptOut]
    payload: WebhookMessage
