"""/v1/deletion-requests: one data subject's request each, batched into unlearning jobs by
the model's policy (/v1/models/{id}/deletion-policy)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from app.api.common import AUTH_ERRORS, PagingDep, SettingsDep, errors
from app.auth import JOB_READERS, Principal, require
from app.db.deletion_repositories import DeletionRequestFilter, DeletionRequestRepository
from app.db.models import DeletionPolicy, DeletionRequestState
from app.dependencies import DbSession, get_queue
from app.queue import JobQueue
from app.schemas.common import ListResponse
from app.schemas.deletion_requests import (
    BatchOut,
    DeletionPolicyOut,
    DeletionPolicyPut,
    DeletionRequestCreate,
    DeletionRequestOut,
)
from app.services import deletion_requests as service

router = APIRouter(tags=["deletion requests"])

Writer = Annotated[Principal, Depends(require("jobs:write"))]
Reader = Annotated[Principal, Depends(require(*JOB_READERS))]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


def policy_out(policy: DeletionPolicy) -> DeletionPolicyOut:
    return DeletionPolicyOut(
        model_id=policy.model_id,
        mode=policy.mode,  # type: ignore[arg-type]
        batch_size=policy.batch_size,
        window_seconds=policy.window_seconds,
        job=policy.job_template,
        last_batch_error=policy.last_batch_error,
        created_at=policy.created_at,
        updated_at=policy.updated_at,
    )


@router.post(
    "/v1/deletion-requests",
    status_code=201,
    response_model=DeletionRequestOut,
    responses={
        200: {
            "model": DeletionRequestOut,
            "description": "A duplicate: the model's lineage already holds every sample "
            "named (pending, batched or forgotten); the answer is the existing request, "
            "also named by the Duplicate-Of header and `duplicate_of`. Nothing is unlearned "
            "again.",
        },
        201: {"description": "Received; PENDING until the model's policy batches it."},
        **errors(*AUTH_ERRORS, 409, 422),
    },
    summary="Receive a data subject's deletion request",
)
def create_request(
    body: DeletionRequestCreate,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    queue: QueueDep,
    response: Response,
) -> DeletionRequestOut:
    """Checks the model, the data set and the samples or classes; each image is hashed, so
    the same picture in another (re-uploaded) data set is recognised as the same sample. A
    request of which only some samples are already held answers 409."""
    request, duplicate_of = service.create_request(session, principal, body, settings, queue)
    response.headers["Location"] = f"/v1/deletion-requests/{request.id}"
    if duplicate_of is not None:
        response.status_code = 200
        response.headers["Duplicate-Of"] = str(duplicate_of.id)
    return service.request_view(session, request, duplicate_of.id if duplicate_of else None)


@router.get(
    "/v1/deletion-requests",
    response_model=ListResponse[DeletionRequestOut],
    responses=errors(*AUTH_ERRORS, 422),
    summary="List deletion requests, newest first",
)
def list_requests(
    principal: Reader,
    session: DbSession,
    paging: PagingDep,
    state: Annotated[list[DeletionRequestState] | None, Query()] = None,
    model_id: Annotated[uuid.UUID | None, Query()] = None,
    subject_reference: Annotated[str | None, Query(max_length=200)] = None,
    job_id: Annotated[uuid.UUID | None, Query()] = None,
) -> ListResponse[DeletionRequestOut]:
    where = DeletionRequestFilter(
        states=state or (), model_id=model_id, subject_reference=subject_reference, job_id=job_id
    )
    repo = DeletionRequestRepository(session, principal.tenant_id)
    page = paging.page(lambda size, token: repo.page(where, size, token))
    return ListResponse(
        items=[service.request_view(session, r) for r in page.items],
        next_page_token=page.next_page_token,
    )


@router.get(
    "/v1/deletion-requests/{request_id}",
    response_model=DeletionRequestOut,
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="Get a deletion request: its state, due date, job, version and evidence",
)
def get_request(request_id: uuid.UUID, principal: Reader, session: DbSession) -> DeletionRequestOut:
    return service.request_view(
        session, service.get_request(session, principal.tenant_id, request_id)
    )


@router.post(
    "/v1/deletion-requests/{request_id}:cancel",
    response_model=DeletionRequestOut,
    responses=errors(*AUTH_ERRORS, 404, 409, 422),
    summary="Withdraw a pending deletion request",
)
def cancel_request(
    request_id: uuid.UUID, principal: Writer, session: DbSession
) -> DeletionRequestOut:
    return service.request_view(session, service.cancel_request(session, principal, request_id))


@router.put(
    "/v1/models/{model_id}/deletion-policy",
    response_model=DeletionPolicyOut,
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="Set how the model's deletion requests are batched, and their jobs' settings",
)
def put_policy(
    model_id: uuid.UUID, body: DeletionPolicyPut, principal: Writer, session: DbSession
) -> DeletionPolicyOut:
    """The batcher submits the policy's jobs as the key that set it last."""
    return policy_out(service.put_policy(session, principal, model_id, body))


@router.get(
    "/v1/models/{model_id}/deletion-policy",
    response_model=DeletionPolicyOut,
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="The model's deletion policy",
)
def get_policy(model_id: uuid.UUID, principal: Reader, session: DbSession) -> DeletionPolicyOut:
    return policy_out(service.get_policy(session, principal.tenant_id, model_id))


@router.post(
    "/v1/models/{model_id}/deletion-requests:batch",
    status_code=202,
    response_model=BatchOut,
    responses={
        200: {
            "model": BatchOut,
            "description": "No job: the only pending requests had failed too often and are "
            "FAILED now (failed_request_ids).",
        },
        **errors(*AUTH_ERRORS, 404, 409, 413, 422, 429),
    },
    summary="Batch the model's pending deletion requests into one job now",
)
def batch_requests(
    model_id: uuid.UUID,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    queue: QueueDep,
    response: Response,
) -> BatchOut:
    """The oldest pending request's data set and kind (ids or classes) make the batch; the
    job starts from the model's latest version. 409 while a batch of the model runs."""
    job, group = service.batch_now(session, principal, model_id, settings, queue)
    if job is None:
        response.status_code = 200
        return BatchOut(job_id=None, request_ids=[], failed_request_ids=[r.id for r in group],
                        links={})  # fmt: skip
    response.headers["Location"] = f"/v1/unlearning-jobs/{job.id}"
    return BatchOut(
        job_id=job.id,
        request_ids=[r.id for r in group],
        links={"job": f"/v1/unlearning-jobs/{job.id}"},
    )
