"""The tables. Every row of tenant data carries tenant_id; repositories filter on it."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, new_id, utcnow


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobStage(enum.StrEnum):
    PREPARING = "preparing"
    FINETUNING = "finetuning"
    MERGING = "merging"
    SEARCHING = "searching"
    EVALUATING = "evaluating"
    STORING = "storing"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # VARCHAR + CHECK rather than a native PostgreSQL enum: adding a value needs no migration
    # dance, and SQLite gets the same column.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The tenant's own retention choices (app.services.retention), over the service's defaults.
    retention_policy: Mapped[dict[str, Any] | None] = mapped_column()


class ApiKey(Base):
    """An API key: only its sha256 is stored; `prefix` lets people tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Model(Base):
    """A registered model; its weights live in versions (1 = the base, then one per job)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    family: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list] = mapped_column()
    # The rest of negmerge's ModelSpec (templates, image_size, init_args, ...), without weights.
    spec: Mapped[dict[str, Any]] = mapped_column()
    latest_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelVersion(Base):
    """One set of weights of a model, with its lineage."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"))
    version: Mapped[int] = mapped_column(Integer)
    weights_uri: Mapped[str] = mapped_column(Text)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # "standard", or "linear": a linearized checkpoint (theta0 and the tangent delta), whose
    # forward is the tangent model; jobs keep a lineage in one mode.
    finetuning: Mapped[str] = mapped_column(String(16), default="standard")
    parent_version_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("model_versions.id"))
    # use_alter: jobs point at versions and versions at the job that made them.
    produced_by_job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("unlearning_jobs.id", use_alter=True)
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A tombstone: the row stays (lineage, reports), the bytes are gone.
    deleted_at: Mapped[datetime | None] = mapped_column()
    deleted_by: Mapped[str | None] = mapped_column(String(200))
    deletion_reason: Mapped[str | None] = mapped_column(Text)
    # A job made the next version from this one: it still holds what that job forgot, so it
    # is neither downloaded nor used as a base unless an admin keeps it (kept_*, a reason).
    superseded_at: Mapped[datetime | None] = mapped_column()
    kept_at: Mapped[datetime | None] = mapped_column()
    kept_by: Mapped[str | None] = mapped_column(String(200))
    kept_reason: Mapped[str | None] = mapped_column(Text)


class Dataset(Base):
    """A validated image data set: a manifest under a root, registered by URI or uploaded."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))  # "uri" or "upload"
    manifest_uri: Mapped[str] = mapped_column(Text)
    root_uri: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))  # ids, paths, labels, splits
    content_sha256: Mapped[str] = mapped_column(String(64))  # ... and every image's bytes
    archive_sha256: Mapped[str | None] = mapped_column(String(64))
    sample_count: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list] = mapped_column()
    split_counts: Mapped[dict[str, Any]] = mapped_column()
    # Bytes the service stores for it (an upload's unpacked files); None: registered by URI,
    # the tenant's own storage.
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A tombstone: the row stays (jobs and reports name it), the stored files are gone.
    deleted_at: Mapped[datetime | None] = mapped_column()
    deleted_by: Mapped[str | None] = mapped_column(String(200))
    deletion_reason: Mapped[str | None] = mapped_column(Text)


class UnlearningJob(Base):
    """A deletion request and the truth about its progress (workers update this row)."""

    __tablename__ = "unlearning_jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_unlearning_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_unlearning_jobs_state", "state"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), index=True)
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"))
    forget_dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"))
    retain_dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("datasets.id"))
    created_by_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))

    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    stage: Mapped[JobStage | None] = mapped_column(_enum(JobStage, "job_stage"))
    variants_total: Mapped[int] = mapped_column(Integer)
    variants_done: Mapped[int] = mapped_column(Integer, default=0)
    lambdas_evaluated: Mapped[int] = mapped_column(Integer, default=0)
    percent: Mapped[float] = mapped_column(default=0.0)
    current_loss: Mapped[float | None] = mapped_column()
    current_images_per_second: Mapped[float | None] = mapped_column()
    # negmerge.finetune.device_usage of that step: MiB allocated and at peak, utilisation
    # percent where known; None on CPU.
    current_device_usage: Mapped[dict[str, Any] | None] = mapped_column()

    subject_reference: Mapped[str | None] = mapped_column(String(200), index=True)
    legal_basis: Mapped[str | None] = mapped_column(String(200))
    webhook_url: Mapped[str | None] = mapped_column(Text)

    request: Mapped[dict[str, Any]] = mapped_column()  # the request body, as accepted
    spec: Mapped[dict[str, Any]] = mapped_column()  # negmerge JobSpec the workers run
    forget_manifest_sha256: Mapped[str] = mapped_column(String(64))
    forget_count: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str] = mapped_column(String(64))

    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column()
    # The tenant's audit chain right after the entry of the job's terminal state: the head a
    # report cites, so a later `audit verify` shows the evidence was in the chain then.
    audit_seq_at_end: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite")
    )
    audit_head_at_end: Mapped[str | None] = mapped_column(String(64))
    # Retention (app.services.retention): None while the job runs; "pending" from the
    # transaction that ends it, "waiting" while its forget data is in use elsewhere, "done".
    retention_state: Mapped[str | None] = mapped_column(String(16), index=True)
    data_deletion: Mapped[dict[str, Any] | None] = mapped_column()  # what was deleted, when

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    cancel_requested_at: Mapped[datetime | None] = mapped_column()


class StepState(enum.StrEnum):
    PENDING = "PENDING"  # its message is sent (or about to be)
    RUNNING = "RUNNING"  # a worker holds the lease
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class JobStep(Base):
    """One step of a job ("prepare", "finetune:3", "merge", "search", "finalize"): the row a
    worker claims with a lease (compare-and-set) before it runs the step. A Celery message
    only names the step; this row says whether it still needs running."""

    __tablename__ = "job_steps"
    __table_args__ = (
        Index("ix_job_steps_state_lease", "state", "lease_expires_at"),
        # A tenant's recent steps: its compute over the last day (the daily quota).
        Index("ix_job_steps_tenant_finished", "tenant_id", "finished_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("unlearning_jobs.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    state: Mapped[StepState] = mapped_column(
        _enum(StepState, "step_state"), default=StepState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column()  # when its message was last sent
    output: Mapped[dict[str, Any] | None] = mapped_column()  # what later steps need
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class JobEvent(Base):
    """One change of a job's state, stage or progress: the report's timeline, and SSE's feed
    (the id is the event id a client resumes from)."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("unlearning_jobs.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # "state", "stage" or "progress"
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_event_state"))
    stage: Mapped[JobStage | None] = mapped_column(_enum(JobStage, "job_event_stage"))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class AuditChainHead(Base):
    """The last link of each audit chain. Appends lock this row, so a chain never forks, and
    verification compares it with the last row, so deleting the newest rows is detected."""

    __tablename__ = "audit_chain_heads"

    chain: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    hash: Mapped[str] = mapped_column(String(64))


class AuditEntry(Base):
    """An append-only, hash-chained record of a state change or state-changing request.

    One chain per tenant (chain = the tenant's id) and one for tenant-less events such as
    creating a tenant (chain = "system"). Each row stores the previous row's hash and its own
    hash over its canonical content; see app.services.audit.
    """

    __tablename__ = "audit_log"
    __table_args__ = (UniqueConstraint("chain", "seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    chain: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id"))
    at: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class WebhookEndpoint(Base):
    """A tenant's URL that receives every job's terminal event, signed with the endpoint's own
    secret. The secret is shown once, at creation, but stored: signing needs it."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(String(200))
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Deleted endpoints stay (their deliveries point at them) but receive nothing more.
    deleted_at: Mapped[datetime | None] = mapped_column()


class WebhookSigningSecret(Base):
    """The tenant's secret for deliveries to a job's own webhook_url. After a rotation the
    previous secret signs too (a second signature) until previous_expires_at."""

    __tablename__ = "webhook_signing_secrets"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_expires_at: Mapped[datetime | None] = mapped_column()


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"  # to be sent (again) at next_attempt_at
    SUCCEEDED = "SUCCEEDED"  # a 2xx answer
    FAILED = "FAILED"  # given up: attempts exhausted, or its endpoint deleted


class WebhookDelivery(Base):
    """The outbox: one message to one URL, inserted in the transaction that ends the job and
    sent afterwards by the deliverer. Its id is the webhook-id, the same on every retry."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("unlearning_jobs.id"), index=True)
    # None: the job's own webhook_url, signed with the tenant's signing secret.
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("webhook_endpoints.id"), index=True
    )
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When it is due; while an attempt is in flight, when that attempt's claim lapses.
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)


class WebhookDeliveryAttempt(Base):
    """One attempt of a delivery: when, to which address, and the answer (or the error)."""

    __tablename__ = "webhook_delivery_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_deliveries.id"))
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    address: Mapped[str | None] = mapped_column(String(64))  # the vetted IP connected to
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)  # None and no status: still in flight
    duration_ms: Mapped[float | None] = mapped_column()


class DeletionRequestState(enum.StrEnum):
    PENDING = "PENDING"  # waiting for a batch (again, after its job failed or was cancelled)
    BATCHED = "BATCHED"  # a job carries it
    FORGOTTEN = "FORGOTTEN"  # the job SUCCEEDED and met its target
    NOT_FORGOTTEN = "NOT_FORGOTTEN"  # the job SUCCEEDED without meeting it: not a success
    FAILED = "FAILED"  # its jobs failed deletion_request_max_attempts times
    CANCELLED = "CANCELLED"  # withdrawn before a job carried it


class DeletionRequest(Base):
    """One data subject's deletion request on a model: what to forget in which data set, its
    due date, and the job and the model version that carry it."""

    __tablename__ = "deletion_requests"
    __table_args__ = (
        Index("ix_deletion_requests_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_deletion_requests_model_state", "model_id", "state"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"))
    subject_reference: Mapped[str] = mapped_column(String(200), index=True)
    legal_basis: Mapped[str | None] = mapped_column(String(200))
    ids: Mapped[list | None] = mapped_column()
    classes: Mapped[list | None] = mapped_column()
    sample_count: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeletionRequestState] = mapped_column(
        _enum(DeletionRequestState, "deletion_request_state"),
        default=DeletionRequestState.PENDING,
    )
    received_at: Mapped[datetime] = mapped_column()
    due_at: Mapped[datetime] = mapped_column()
    created_by_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("unlearning_jobs.id"), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # jobs that carried it
    model_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("model_versions.id"), index=True
    )
    # Its own samples' metrics before and after, from the job's result (groups).
    evidence: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class DeletionRequestSample(Base):
    """What a request forgets, one row per sample (its image's sha256, so the same picture in
    a re-uploaded data set is the same sample) or class ("class:<name>"): duplicates in a
    model's lineage are found by these keys."""

    __tablename__ = "deletion_request_samples"
    __table_args__ = (Index("ix_deletion_request_samples_model_key", "model_id", "sample_key"),)

    request_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("deletion_requests.id"), primary_key=True
    )
    sample_key: Mapped[str] = mapped_column(String(80), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"))


class DeletionPolicy(Base):
    """How a model's pending requests become jobs: manual, count (a job once `batch_size`
    are pending) or window (a job `window_seconds` after the oldest pending one), and the
    settings of those jobs (an UnlearningJobCreate body without model, forget or subject)."""

    __tablename__ = "deletion_policies"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    mode: Mapped[str] = mapped_column(String(16))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    window_seconds: Mapped[int | None] = mapped_column(Integer)
    job_template: Mapped[dict[str, Any]] = mapped_column()
    # The key that set it: the batcher submits the policy's jobs as this key.
    updated_by_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id"))
    last_batch_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
