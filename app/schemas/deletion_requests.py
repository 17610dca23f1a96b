"""Deletion requests (one data subject's) and a model's deletion policy."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.common import Strict
from app.schemas.jobs import DeletionRequestRecord, GroupMetrics, JobSettings, RequestEvidence

__all__ = ["GroupMetrics", "RequestEvidence"]  # defined with the report, which files them

REQUEST_EXAMPLE = {
    "model_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    "dataset_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "ids": ["img-0001", "img-0002"],
    "subject_reference": "DSR-2025-0042",
    "legal_basis": "GDPR Art. 17",
}


class DeletionRequestCreate(Strict):
    """One data subject's request: what to forget (samples by id, or whole classes) in a data
    set, on a model."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [REQUEST_EXAMPLE]})

    model_id: uuid.UUID
    dataset_id: uuid.UUID
    ids: list[str] | None = Field(None, min_length=1, max_length=1_000_000)
    classes: list[str] | None = Field(None, min_length=1, max_length=10_000)
    subject_reference: str = Field(
        min_length=1, max_length=200, description="Your reference for the subject or ticket."
    )
    legal_basis: str | None = Field(None, max_length=200, examples=["GDPR Art. 17"])
    received_at: datetime | None = Field(
        None, description="When the subject asked (default: now). With a time zone."
    )
    due_at: datetime | None = Field(
        None,
        description="When it must be done (default: received_at plus the configured months, "
        "one by default as GDPR Art. 12(3)). With a time zone.",
    )

    @model_validator(mode="after")
    def _one_selection(self) -> DeletionRequestCreate:
        if (self.ids is None) == (self.classes is None):
            raise ValueError("ids: name the samples (ids) or the classes to forget, one of them")
        for name in ("received_at", "due_at"):
            moment = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name}: give a time zone (e.g. 2026-01-31T09:00:00Z)")
            if moment is not None and not 1970 < moment.year < 9000:
                raise ValueError(f"{name}: not a plausible date")
        if self.received_at and self.due_at and self.due_at < self.received_at:
            raise ValueError("due_at: before received_at")
        return self


class DeletionRequestLinks(BaseModel):
    self: str
    job: str | None = None
    model_version: str | None = None


class DeletionRequestOut(DeletionRequestRecord):
    overdue: bool = Field(description="Past its due date and not settled.")
    duplicate_of: uuid.UUID | None = Field(
        None, description="Set on the answer to a duplicate request: this existing request."
    )
    created_at: datetime
    updated_at: datetime
    links: DeletionRequestLinks


class DeletionPolicyPut(Strict):
    """How the model's pending requests become jobs, and those jobs' settings."""

    mode: Literal["manual", "count", "window"] = Field(
        description="manual: POST /v1/models/{id}/deletion-requests:batch; count: a job as "
        "soon as batch_size requests are pending; window: a job window_seconds after the "
        "oldest pending request arrived."
    )
    batch_size: int | None = Field(None, ge=1, le=100_000)
    window_seconds: int | None = Field(None, ge=1, le=366 * 24 * 3600)
    job: JobSettings = Field(description="The settings of the jobs this policy makes.")

    @model_validator(mode="after")
    def _parameters(self) -> DeletionPolicyPut:
        if self.mode == "count" and self.batch_size is None:
            raise ValueError("batch_size: needed with mode count")
        if self.mode == "window" and self.window_seconds is None:
            raise ValueError("window_seconds: needed with mode window")
        return self


class DeletionPolicyOut(BaseModel):
    model_id: uuid.UUID
    mode: Literal["manual", "count", "window"]
    batch_size: int | None = None
    window_seconds: int | None = None
    job: dict[str, Any]
    last_batch_error: str | None = Field(
        None, description="Why the last automatic batch could not start (it is tried again)."
    )
    created_at: datetime
    updated_at: datetime


class BatchOut(BaseModel):
    job_id: uuid.UUID | None = Field(description="The job that carries the requests.")
    request_ids: list[uuid.UUID]
    failed_request_ids: list[uuid.UUID] = Field(
        default_factory=list,
        description="Requests FAILED instead: their jobs failed deletion_request_max_attempts "
        "times.",
    )
    links: dict[str, str]
