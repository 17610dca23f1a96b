"""Deletion requests, the sample keys they forget, and the models' batching policies."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import (
    DeletionPolicy,
    DeletionRequest,
    DeletionRequestSample,
    DeletionRequestState,
)
from app.db.repositories import Page, TenantScoped, newest_first_page

# The states in which a request's samples count as forgotten or on their way: a second
# request for them is a duplicate. A request that failed, was cancelled or was not forgotten
# leaves its samples free for another.
HOLDING_STATES = (
    DeletionRequestState.PENDING,
    DeletionRequestState.BATCHED,
    DeletionRequestState.FORGOTTEN,
)


@dataclass(frozen=True)
class DeletionRequestFilter:
    states: Sequence[DeletionRequestState] = ()
    model_id: uuid.UUID | None = None
    subject_reference: str | None = None
    job_id: uuid.UUID | None = None


class DeletionRequestRepository(TenantScoped[DeletionRequest]):
    model = DeletionRequest

    def page(self, where: DeletionRequestFilter, page_size: int, page_token: str | None) -> Page:
        stmt = self._select()
        if where.states:
            stmt = stmt.where(DeletionRequest.state.in_(list(where.states)))
        for column, value in (
            (DeletionRequest.model_id, where.model_id),
            (DeletionRequest.subject_reference, where.subject_reference),
            (DeletionRequest.job_id, where.job_id),
        ):
            if value is not None:
                stmt = stmt.where(column == value)
        return newest_first_page(self.session, stmt, DeletionRequest, page_size, page_token)

    def add_samples(self, request: DeletionRequest, keys: Iterable[str]) -> None:
        self.session.add_all(
            DeletionRequestSample(
                request_id=request.id,
                sample_key=key,
                tenant_id=self.tenant_id,
                model_id=request.model_id,
            )
            for key in keys
        )
        self.session.flush()

    def holding(self, model_id: uuid.UUID, keys: Sequence[str]) -> dict[uuid.UUID, int]:
        """The model's requests that hold any of `keys` (HOLDING_STATES), with how many of
        them each holds."""
        found: dict[uuid.UUID, int] = {}
        for start in range(0, len(keys), 1000):  # bounded IN lists
            stmt = (
                select(DeletionRequestSample.request_id, func.count())
                .join(DeletionRequest, DeletionRequest.id == DeletionRequestSample.request_id)
                .where(
                    DeletionRequestSample.tenant_id == self.tenant_id,
                    DeletionRequestSample.model_id == model_id,
                    DeletionRequestSample.sample_key.in_(list(keys[start : start + 1000])),
                    DeletionRequest.state.in_(HOLDING_STATES),
                )
                .group_by(DeletionRequestSample.request_id)
            )
            for request_id, count in self.session.execute(stmt):
                found[request_id] = found.get(request_id, 0) + count
        return found

    def of_model(
        self, model_id: uuid.UUID, state: DeletionRequestState, *, for_update: bool = False
    ) -> list[DeletionRequest]:
        """The model's requests in `state`, oldest first."""
        stmt = (
            self._select()
            .where(DeletionRequest.model_id == model_id, DeletionRequest.state == state)
            .order_by(DeletionRequest.created_at, DeletionRequest.id)
        )
        if for_update:
            stmt = stmt.with_for_update()
        return list(self.session.scalars(stmt))

    def of_job(self, job_id: uuid.UUID, *, for_update: bool = False) -> list[DeletionRequest]:
        stmt = self._select().where(DeletionRequest.job_id == job_id)
        if for_update:
            stmt = stmt.with_for_update()
        return list(self.session.scalars(stmt.order_by(DeletionRequest.created_at)))

    def carried_by_versions(self, model_id: uuid.UUID) -> dict[uuid.UUID, list[uuid.UUID]]:
        """The requests each of the model's versions carries, by version id."""
        stmt = (
            select(DeletionRequest.model_version_id, DeletionRequest.id)
            .where(
                DeletionRequest.tenant_id == self.tenant_id,
                DeletionRequest.model_id == model_id,
                DeletionRequest.model_version_id.is_not(None),
            )
            .order_by(DeletionRequest.created_at, DeletionRequest.id)
        )
        found: dict[uuid.UUID, list[uuid.UUID]] = {}
        for version_id, request_id in self.session.execute(stmt):
            found.setdefault(version_id, []).append(request_id)
        return found


class DeletionPolicyRepository:
    """Each model's batching policy (at most one), by model id, for one tenant."""

    def __init__(self, session: Session, tenant_id: uuid.UUID) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def get(self, model_id: uuid.UUID) -> DeletionPolicy | None:
        stmt = select(DeletionPolicy).where(
            DeletionPolicy.tenant_id == self.tenant_id, DeletionPolicy.model_id == model_id
        )
        return self.session.scalars(stmt).one_or_none()

    def add(self, policy: DeletionPolicy) -> DeletionPolicy:
        policy.tenant_id = self.tenant_id
        self.session.add(policy)
        self.session.flush()
        return policy


def automatic_policies_with_pending(session: Session) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(tenant id, model id) of every count or window policy whose model has a PENDING
    request: the batcher's work list, over all tenants (like StepRepository, it acts for the
    system; what it writes goes through the tenant's repositories)."""
    pending = (
        select(DeletionRequest.id)
        .where(
            DeletionRequest.model_id == DeletionPolicy.model_id,
            DeletionRequest.state == DeletionRequestState.PENDING,
        )
        .exists()
    )
    stmt = select(DeletionPolicy.tenant_id, DeletionPolicy.model_id).where(
        DeletionPolicy.mode.in_(["count", "window"]), pending
    )
    return [(row[0], row[1]) for row in session.execute(stmt)]
