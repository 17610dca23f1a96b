"""All queries live here. Every repository of tenant data is built for one tenant and filters
every statement by it, so a service cannot reach another tenant's rows by mistake.

The exceptions, named as such: `ApiKeyRepository.find_by_hash` (authentication happens before
the tenant is known), `TenantRepository` (used by administrators' commands, and to read one
tenant's own settings by its id), `AuditChainRepository` (scoped to one audit chain, which is
a tenant's or the system's) and `StepRepository` (the workers and the watchdog act for the
system: a message names a job by id only; what they write for a tenant goes through that
tenant's repositories).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, bindparam, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import (
    TERMINAL_STATES,
    ApiKey,
    AuditChainHead,
    AuditEntry,
    Dataset,
    JobEvent,
    JobStage,
    JobState,
    JobStep,
    Model,
    ModelVersion,
    StepState,
    Tenant,
    UnlearningJob,
)
from app.db.session import Lookup

Row = TypeVar("Row")


class InvalidPageToken(ValueError):
    """A page token that this service did not hand out."""

    def __init__(self, reason: str = "not a token this service handed out") -> None:
        super().__init__(f"page_token: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Page(Generic[Row]):
    items: list[Row]
    next_page_token: str | None


def encode_page_token(values: Sequence[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else str(v) for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> list[str]:
    try:
        values = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidPageToken() from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidPageToken()
    return values


def newest_first_page(
    session: Session, stmt: Select, model: type, page_size: int, page_token: str | None
) -> Page:
    """Keyset pagination over (created_at, id), newest first: stable while rows are added."""
    if page_token:
        values = decode_page_token(page_token)
        try:
            created_at, row_id = datetime.fromisoformat(values[0]), uuid.UUID(values[1])
        except (ValueError, IndexError):
            raise InvalidPageToken() from None
        # Spelled out rather than a row-value comparison: SQLite and PostgreSQL agree on it.
        stmt = stmt.where(
            or_(
                model.created_at < created_at,
                (model.created_at == created_at) & (model.id < row_id),
            )
        )
    stmt = stmt.order_by(model.created_at.desc(), model.id.desc()).limit(page_size + 1)
    rows = list(session.scalars(stmt))
    next_token = None
    if len(rows) > page_size:
        rows = rows[:page_size]
        next_token = encode_page_token([rows[-1].created_at, rows[-1].id])
    return Page(rows, next_token)


class TenantScoped(Generic[Row]):
    """Base of the repositories of tenant data: every statement starts from `_select`."""

    model: type

    def __init__(self, session: Session, tenant_id: uuid.UUID) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def _select(self) -> Select:
        return select(self.model).where(self.model.tenant_id == self.tenant_id)

    def get(self, row_id: uuid.UUID, *, for_update: bool = False) -> Row | None:
        stmt = self._select().where(self.model.id == row_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalars(stmt).one_or_none()

    def add(self, row: Row) -> Row:
        row.tenant_id = self.tenant_id  # type: ignore[attr-defined]
        self.session.add(row)
        self.session.flush()
        return row


class ModelRepository(TenantScoped[Model]):
    model = Model

    def get_by_name(self, name: str) -> Model | None:
        return self.session.scalars(self._select().where(Model.name == name)).one_or_none()

    def page(self, page_size: int, page_token: str | None) -> Page[Model]:
        return newest_first_page(self.session, self._select(), Model, page_size, page_token)

    def versions(self, model_id: uuid.UUID) -> list[ModelVersion]:
        stmt = (
            select(ModelVersion)
            .where(ModelVersion.tenant_id == self.tenant_id, ModelVersion.model_id == model_id)
            .order_by(ModelVersion.version)
        )
        return list(self.session.scalars(stmt))

    def version(self, model_id: uuid.UUID, version: int) -> ModelVersion | None:
        stmt = select(ModelVersion).where(
            ModelVersion.tenant_id == self.tenant_id,
            ModelVersion.model_id == model_id,
            ModelVersion.version == version,
        )
        return self.session.scalars(stmt).one_or_none()

    def version_by_id(self, version_id: uuid.UUID) -> ModelVersion | None:
        stmt = select(ModelVersion).where(
            ModelVersion.tenant_id == self.tenant_id, ModelVersion.id == version_id
        )
        return self.session.scalars(stmt).one_or_none()

    def add_version(self, version: ModelVersion) -> ModelVersion:
        version.tenant_id = self.tenant_id
        self.session.add(version)
        self.session.flush()
        return version


class DatasetRepository(TenantScoped[Dataset]):
    model = Dataset

    def page(
        self, page_size: int, page_token: str | None, include_deleted: bool = False
    ) -> Page[Dataset]:
        stmt = self._select()
        if not include_deleted:
            stmt = stmt.where(Dataset.deleted_at.is_(None))
        return newest_first_page(self.session, stmt, Dataset, page_size, page_token)


@dataclass(frozen=True)
class JobFilter:
    states: Sequence[JobState] = ()
    model_id: uuid.UUID | None = None
    subject_reference: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class JobRepository(TenantScoped[UnlearningJob]):
    model = UnlearningJob

    def get_by_idempotency_key(self, key: str) -> UnlearningJob | None:
        stmt = self._select().where(UnlearningJob.idempotency_key == key)
        return self.session.scalars(stmt).one_or_none()

    def page(self, where: JobFilter, page_size: int, page_token: str | None) -> Page:
        stmt = self._select()
        if where.states:
            stmt = stmt.where(UnlearningJob.state.in_(list(where.states)))
        if where.model_id is not None:
            stmt = stmt.where(UnlearningJob.model_id == where.model_id)
        if where.subject_reference is not None:
            stmt = stmt.where(UnlearningJob.subject_reference == where.subject_reference)
        if where.created_after is not None:
            stmt = stmt.where(UnlearningJob.created_at >= where.created_after)
        if where.created_before is not None:
            stmt = stmt.where(UnlearningJob.created_at < where.created_before)
        return newest_first_page(self.session, stmt, UnlearningJob, page_size, page_token)

    def same_forget_set(self, model_id: uuid.UUID, manifest_sha256: str) -> list[UnlearningJob]:
        """The model's jobs whose forget set hashes to `manifest_sha256`, newest first."""
        stmt = (
            self._select()
            .where(
                UnlearningJob.model_id == model_id,
                UnlearningJob.forget_manifest_sha256 == manifest_sha256,
            )
            .order_by(UnlearningJob.created_at.desc())
        )
        return list(self.session.scalars(stmt))

    def active_using_dataset(self, dataset_id: uuid.UUID) -> list[UnlearningJob]:
        """The jobs that have not ended and forget from, or retain on, the data set."""
        stmt = self._select().where(
            UnlearningJob.state.not_in(list(TERMINAL_STATES)),
            or_(
                UnlearningJob.forget_dataset_id == dataset_id,
                UnlearningJob.retain_dataset_id == dataset_id,
            ),
        )
        return list(self.session.scalars(stmt))

    def active_using_version(self, version_id: uuid.UUID) -> list[UnlearningJob]:
        """The jobs that have not ended and run on the model version as their base."""
        stmt = self._select().where(
            UnlearningJob.state.not_in(list(TERMINAL_STATES)),
            UnlearningJob.model_version_id == version_id,
        )
        return list(self.session.scalars(stmt))

    def add_event(self, event: JobEvent) -> None:
        event.tenant_id = self.tenant_id
        self.session.add(event)

    def events(self, job_id: uuid.UUID) -> list[JobEvent]:
        stmt = (
            select(JobEvent)
            .where(JobEvent.tenant_id == self.tenant_id, JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        )
        return list(self.session.scalars(stmt))


# Tenants' jobs, by (tenant id, job id), as GET shows them: every column but the large request
# and spec documents, plus the model version's number (`model_version`). Built once: composing
# a statement costs more than running it, on the polling hot path.
JOB_VIEW: Lookup[tuple[uuid.UUID, uuid.UUID]] = Lookup(
    statement=select(
        *[c for c in UnlearningJob.__table__.c if c.name not in ("request", "spec")],
        ModelVersion.version.label("model_version"),
    )
    .join(ModelVersion, ModelVersion.id == UnlearningJob.model_version_id)
    .where(
        UnlearningJob.tenant_id.in_(bindparam("tenant_ids", expanding=True)),
        UnlearningJob.id.in_(bindparam("job_ids", expanding=True)),
    ),
    # Only a row whose (tenant, id) pair was asked for answers anyone: a job id asked for by
    # another tenant finds nothing.
    bind=lambda keys: {
        "tenant_ids": list({tenant for tenant, _ in keys}),
        "job_ids": [job for _, job in keys],
    },
    key=lambda row: (row.tenant_id, row.id),
)


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class AuditRepository(TenantScoped[AuditEntry]):
    """The tenant's own chain, newest first."""

    model = AuditEntry

    def page(self, where: AuditFilter, page_size: int, page_token: str | None) -> Page:
        stmt = self._select()
        for column, value in (
            (AuditEntry.action, where.action),
            (AuditEntry.resource_type, where.resource_type),
            (AuditEntry.resource_id, where.resource_id),
        ):
            if value is not None:
                stmt = stmt.where(column == value)
        if where.since is not None:
            stmt = stmt.where(AuditEntry.at >= where.since)
        if where.until is not None:
            stmt = stmt.where(AuditEntry.at < where.until)
        if page_token:
            values = decode_page_token(page_token)
            if len(values) != 1 or not values[0].isdigit():
                raise InvalidPageToken()
            stmt = stmt.where(AuditEntry.id < int(values[0]))
        rows = list(self.session.scalars(stmt.order_by(AuditEntry.id.desc()).limit(page_size + 1)))
        if len(rows) <= page_size:
            return Page(rows, None)
        return Page(rows[:page_size], encode_page_token([rows[page_size - 1].id]))

    def first_seq_of(self, resource_type: str, resource_id: str) -> int | None:
        """The seq of the first entry about a resource (None: there is none)."""
        stmt = select(func.min(AuditEntry.seq)).where(
            AuditEntry.tenant_id == self.tenant_id,
            AuditEntry.resource_type == resource_type,
            AuditEntry.resource_id == resource_id,
        )
        return self.session.execute(stmt).scalar_one()

    def seq_range(self, first: int, last: int | None, limit: int) -> list[AuditEntry]:
        """Every entry of the tenant's chain from seq `first` to `last` (None: the newest),
        oldest first, at most `limit` of them."""
        stmt = self._select().where(AuditEntry.seq >= first)
        if last is not None:
            stmt = stmt.where(AuditEntry.seq <= last)
        return list(self.session.scalars(stmt.order_by(AuditEntry.seq).limit(limit)))


class AuditChainRepository:
    """One audit chain (a tenant's, or the system's: see app.services.audit): its head and its
    entries. Built for one chain, so that an append or a verification never reads another's."""

    def __init__(self, session: Session, chain: str) -> None:
        self.session = session
        self.chain = chain

    def lock_head(self, genesis_hash: str) -> AuditChainHead:
        """The chain's head, locked until the transaction ends (so that the chain never forks);
        a chain without one gets one at seq 0 with `genesis_hash`."""
        stmt = (
            select(AuditChainHead)
            .where(AuditChainHead.chain == self.chain)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        head = self.session.scalars(stmt).one_or_none()
        if head is not None:
            return head
        try:
            with self.session.begin_nested():  # two first appends may race to create the head
                head = AuditChainHead(chain=self.chain, seq=0, hash=genesis_hash)
                self.session.add(head)
        except IntegrityError:
            head = self.session.scalars(stmt).one()
        return head

    def head(self) -> AuditChainHead | None:
        return self.session.get(AuditChainHead, self.chain)

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry of the chain, oldest first, read a thousand at a time."""
        stmt = select(AuditEntry).where(AuditEntry.chain == self.chain).order_by(AuditEntry.seq)
        return iter(self.session.scalars(stmt.execution_options(yield_per=1000)))


def audit_chains(session: Session) -> set[str]:
    """Every audit chain that has a head or an entry: administrators' verification."""
    chains = set(session.scalars(select(AuditChainHead.chain)))
    return chains | set(session.scalars(select(AuditEntry.chain).distinct()))


class ApiKeyRepository:
    """API keys. Looking one up by its hash is the one query made before the tenant is known."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def find_by_hash(self, key_hash: str) -> ApiKey | None:
        stmt = select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        return self.session.scalars(stmt).one_or_none()

    def for_tenant(self, tenant_id: uuid.UUID) -> list[ApiKey]:
        stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)
        return list(self.session.scalars(stmt))

    def get(self, key_id: uuid.UUID) -> ApiKey | None:
        return self.session.get(ApiKey, key_id)

    def of_tenant(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey | None:
        """The tenant's key `key_id` (revoked or not); another tenant's key is None."""
        stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.id == key_id)
        return self.session.scalars(stmt).one_or_none()

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key


class TenantRepository:
    """Tenants themselves: administrators' commands, and one tenant's own settings read by its
    id (e.g. its retention policy)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get_by_name(self, name: str) -> Tenant | None:
        return self.session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()

    def get(self, tenant_id: uuid.UUID) -> Tenant | None:
        return self.session.get(Tenant, tenant_id)

    def all(self) -> list[Tenant]:
        return list(self.session.scalars(select(Tenant).order_by(Tenant.created_at)))

    def owner_of_model(self, model_id: uuid.UUID) -> uuid.UUID | None:
        """The tenant a model belongs to (an administrator names models by id alone)."""
        return self.session.scalar(select(Model.tenant_id).where(Model.id == model_id))

    def add(self, tenant: Tenant) -> Tenant:
        self.session.add(tenant)
        self.session.flush()
        return tenant


def fine_tuning_throughput(session: Session) -> float:
    """The training images per second of the jobs fine-tuning now, summed (each job's latest
    rate): operators' metrics, over all tenants."""
    stmt = select(func.coalesce(func.sum(UnlearningJob.current_images_per_second), 0.0)).where(
        UnlearningJob.state == JobState.RUNNING, UnlearningJob.stage == JobStage.FINETUNING
    )
    return float(session.execute(stmt).scalar_one())


def fine_tuning_device_usage(session: Session) -> list[dict[str, Any]]:
    """The device use of the jobs fine-tuning now (each one's latest step), for those that
    reported one (CPU runs report none): operators' metrics, over all tenants."""
    stmt = select(UnlearningJob.current_device_usage).where(
        UnlearningJob.state == JobState.RUNNING,
        UnlearningJob.stage == JobStage.FINETUNING,
        UnlearningJob.current_device_usage.is_not(None),
    )
    return [usage for usage in session.execute(stmt).scalars() if usage]


def count_jobs_by_state(session: Session) -> dict[str, int]:
    """Jobs per state over all tenants: operators' metrics, never shown to a tenant."""
    stmt = select(UnlearningJob.state, func.count()).group_by(UnlearningJob.state)
    return {state.value: count for state, count in session.execute(stmt)}


def try_transaction_lock(session: Session, key: int) -> bool:
    """Take PostgreSQL's advisory lock `key` until the transaction ends, if no other
    transaction holds it: True if taken."""
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(key))))


class StepRepository:
    """Jobs by id and their steps, for the workers and the watchdog (not tenant-scoped: see
    the module's docstring)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def lock_job(self, job_id: uuid.UUID) -> UnlearningJob | None:
        """The job's row, locked until the transaction ends: every change to a job's steps
        happens under this lock, so claims, completions and the fan-in are serialised."""
        stmt = select(UnlearningJob).where(UnlearningJob.id == job_id).with_for_update()
        return self.session.scalars(stmt).one_or_none()

    def job_state(self, job_id: uuid.UUID) -> JobState | None:
        stmt = select(UnlearningJob.state).where(UnlearningJob.id == job_id)
        return self.session.scalars(stmt).one_or_none()

    def by_retention_state(self, states: Sequence[str], limit: int) -> list[uuid.UUID]:
        """Jobs whose retention is in one of `states`, the earliest finished first."""
        stmt = (
            select(UnlearningJob.id)
            .where(UnlearningJob.retention_state.in_(list(states)))
            .order_by(UnlearningJob.finished_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def step(self, job_id: uuid.UUID, name: str) -> JobStep | None:
        stmt = select(JobStep).where(JobStep.job_id == job_id, JobStep.name == name)
        return self.session.scalars(stmt.with_for_update()).one_or_none()

    def steps(self, job_id: uuid.UUID) -> list[JobStep]:
        stmt = select(JobStep).where(JobStep.job_id == job_id).order_by(JobStep.created_at)
        return list(self.session.scalars(stmt))

    def add_step(self, step: JobStep) -> JobStep:
        self.session.add(step)
        self.session.flush()
        return step

    def count_steps(self, job_id: uuid.UUID, prefix: str, state: StepState | None = None) -> int:
        """Steps of the job whose name starts with `prefix` (in `state`, if given)."""
        stmt = select(func.count()).where(JobStep.job_id == job_id, JobStep.name.startswith(prefix))
        if state is not None:
            stmt = stmt.where(JobStep.state == state)
        return int(self.session.scalar(stmt) or 0)

    def renew_lease(self, job_id: uuid.UUID, name: str, owner: str, until: datetime) -> bool:
        """Extend the lease `owner` holds; False if it holds it no more."""
        stmt = (
            update(JobStep)
            .where(
                JobStep.job_id == job_id,
                JobStep.name == name,
                JobStep.lease_owner == owner,
                JobStep.state == StepState.RUNNING,
            )
            .values(lease_expires_at=until)
        )
        return self.session.execute(stmt).rowcount == 1

    def set_current_loss(
        self,
        job_id: uuid.UUID,
        loss: float,
        now: datetime,
        images_per_second: float | None = None,
        device_usage: dict[str, float] | None = None,
    ) -> None:
        stmt = (
            update(UnlearningJob)
            .where(UnlearningJob.id == job_id)
            .values(
                current_loss=loss,
                current_images_per_second=images_per_second,
                current_device_usage=device_usage,
                updated_at=now,
            )
        )
        self.session.execute(stmt)

    def expired_leases(self, now: datetime, limit: int = 100) -> list[tuple[uuid.UUID, str]]:
        stmt = (
            select(JobStep.job_id, JobStep.name)
            .where(JobStep.state == StepState.RUNNING, JobStep.lease_expires_at < now)
            .limit(limit)
        )
        return [(row[0], row[1]) for row in self.session.execute(stmt)]

    def unsent_steps(self, sent_before: datetime, limit: int = 100) -> list[tuple[uuid.UUID, str]]:
        """Steps waiting for a worker whose message was sent before `sent_before`, of jobs
        that are still going."""
        stmt = (
            select(JobStep.job_id, JobStep.name)
            .join(UnlearningJob, UnlearningJob.id == JobStep.job_id)
            .where(
                JobStep.state == StepState.PENDING,
                or_(JobStep.sent_at.is_(None), JobStep.sent_at < sent_before),
                UnlearningJob.state.in_([JobState.QUEUED, JobState.RUNNING]),
            )
            .limit(limit)
        )
        return [(row[0], row[1]) for row in self.session.execute(stmt)]

    def queued_without_steps(self, created_before: datetime, limit: int = 100) -> list[uuid.UUID]:
        """QUEUED jobs no worker has seen: their first message may never have been sent."""
        has_steps = select(JobStep.job_id).where(JobStep.job_id == UnlearningJob.id).exists()
        stmt = (
            select(UnlearningJob.id)
            .where(
                UnlearningJob.state == JobState.QUEUED,
                UnlearningJob.created_at < created_before,
                ~has_steps,
            )
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def cancelling_without_runner(self, now: datetime, limit: int = 100) -> list[uuid.UUID]:
        """CANCELLING jobs with no step under a live lease: nobody is left to notice."""
        running = (
            select(JobStep.job_id)
            .where(
                JobStep.job_id == UnlearningJob.id,
                JobStep.state == StepState.RUNNING,
                JobStep.lease_expires_at >= now,
            )
            .exists()
        )
        stmt = (
            select(UnlearningJob.id)
            .where(UnlearningJob.state == JobState.CANCELLING, ~running)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))
