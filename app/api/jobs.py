"""/v1/unlearning-jobs: deletion requests as long-running jobs."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from app.api.common import AUTH_ERRORS, PagingDep, SettingsDep, errors
from app.auth import JOB_READERS, Principal, require
from app.db.models import JobState, UnlearningJob
from app.db.repositories import (
    JOB_VIEW,
    JobFilter,
    JobRepository,
    ModelRepository,
)
from app.db.session import Database
from app.dependencies import DbSession, get_queue
from app.errors import ErrorResponse, NotFound
from app.queue import JobQueue
from app.schemas.common import ListResponse
from app.schemas.jobs import (
    JobError,
    JobForgetSet,
    JobLinks,
    JobModelRef,
    JobProgress,
    UnlearningJobCreate,
    UnlearningJobOut,
    UnlearningReport,
)
from app.schemas.results import JobResult
from app.services import job_states, job_submission, reports
from app.services.report_signing import signer_for
from app.services.results import data_deletion

router = APIRouter(prefix="/v1/unlearning-jobs", tags=["unlearning jobs"])

Writer = Annotated[Principal, Depends(require("jobs:write"))]
Reader = Annotated[Principal, Depends(require(*JOB_READERS))]


def job_out(job: UnlearningJob, version: int) -> UnlearningJobOut:
    base = f"/v1/unlearning-jobs/{job.id}"
    result = JobResult.of(job.result)
    return UnlearningJobOut(
        id=job.id,
        state=job.state,
        stage=job.stage,
        progress=JobProgress.of(job),
        model=JobModelRef(id=job.model_id, version=version),
        forget=JobForgetSet(
            dataset_id=job.forget_dataset_id,
            count=job.forget_count,
            manifest_sha256=job.forget_manifest_sha256,
        ),
        subject_reference=job.subject_reference,
        legal_basis=job.legal_basis,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        cancel_requested_at=job.cancel_requested_at,
        error=JobError(code=job.error_code, message=job.error_message or "")
        if job.error_code
        else None,
        verdict=result.verdict if result else None,
        result=result,
        data_deletion=data_deletion(job),
        links=JobLinks(self=base, report=f"{base}/report", cancel=f"{base}:cancel"),
    )


def _version_number(session: DbSession, job: UnlearningJob) -> int:
    version = ModelRepository(session, job.tenant_id).version_by_id(job.model_version_id)
    return version.version if version is not None else 0


def _retry_after(response: Response, job: UnlearningJob, seconds: int) -> None:
    if not job.state.is_terminal:
        response.headers["Retry-After"] = str(seconds)


@router.post(
    "",
    status_code=202,
    response_model=UnlearningJobOut,
    responses={
        202: {
            "description": "Accepted; Location names the job. A repeated Idempotency-Key "
            "with the same body answers with the same job."
        },
        409: {
            "model": ErrorResponse,
            "description": "A job of this model with the same forget set is under way or "
            "has met its target; the message names it (send allow_repeat to run it again).",
        },
        **errors(*AUTH_ERRORS, 413, 422, 429),
    },
    summary="Submit a deletion request",
)
def submit_job(
    body: UnlearningJobCreate,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    queue: Annotated[JobQueue, Depends(get_queue)],
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="Makes retries safe: the same key and body give the same job; the "
            "same key with another body is refused (422).",
        ),
    ] = None,
) -> UnlearningJobOut:
    """Validates the request against the model, the data and the method, and queues the job.
    Nothing is done in the request itself: workers carry the job out."""
    submission = job_submission.submit_job(
        session, principal, body, idempotency_key, settings, queue
    )
    job = submission.job
    response.headers["Location"] = f"/v1/unlearning-jobs/{job.id}"
    if not submission.created:
        response.headers["Idempotent-Replayed"] = "true"
    _retry_after(response, job, settings.retry_after_seconds)
    return job_out(job, _version_number(session, job))


@router.get(
    "",
    response_model=ListResponse[UnlearningJobOut],
    responses=errors(*AUTH_ERRORS, 422),
    summary="List jobs, newest first",
)
def list_jobs(
    principal: Reader,
    session: DbSession,
    paging: PagingDep,
    state: Annotated[list[JobState] | None, Query(description="One or more states.")] = None,
    model_id: Annotated[uuid.UUID | None, Query()] = None,
    subject_reference: Annotated[str | None, Query(max_length=200)] = None,
    created_after: Annotated[datetime | None, Query(description="At or after (UTC).")] = None,
    created_before: Annotated[datetime | None, Query(description="Before (UTC).")] = None,
) -> ListResponse[UnlearningJobOut]:
    where = JobFilter(
        states=state or (),
        model_id=model_id,
        subject_reference=subject_reference,
        created_after=_aware(created_after),
        created_before=_aware(created_before),
    )
    page = paging.page(functools.partial(JobRepository(session, principal.tenant_id).page, where))
    return ListResponse(
        items=[job_out(job, _version_number(session, job)) for job in page.items],
        next_page_token=page.next_page_token,
    )


@router.get(
    "/{job_id}",
    response_model=UnlearningJobOut,
    responses={
        200: {"description": "The job; Retry-After is set while it has not ended."},
        **errors(*AUTH_ERRORS, 404, 422),
    },
    summary="Get a job's state and progress",
)
async def get_job(
    job_id: uuid.UUID, principal: Reader, request: Request, settings: SettingsDep
) -> Response:
    # The path dashboards poll: one statement (batched with concurrent polls) on the event
    # loop, and the model serialised once (returning a Response skips FastAPI's second
    # validation of it).
    database: Database = request.app.state.db
    row = await database.look_up(JOB_VIEW, (principal.tenant_id, job_id))
    if row is None:
        raise NotFound(f"unlearning job {job_id} not found")
    response = Response(
        job_out(row, row.model_version).model_dump_json(by_alias=True),  # type: ignore[arg-type]
        media_type="application/json",
    )
    _retry_after(response, row, settings.retry_after_seconds)  # type: ignore[arg-type]
    return response


@router.post(
    "/{job_id}:cancel",
    response_model=UnlearningJobOut,
    responses=errors(*AUTH_ERRORS, 404, 409, 422),
    summary="Cancel a job (best effort)",
)
def cancel_job(
    job_id: uuid.UUID,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    response: Response,
) -> UnlearningJobOut:
    """A queued job is CANCELLED at once; a running one becomes CANCELLING and ends
    CANCELLED when its worker stops. A job that has ended answers 409."""
    job = job_states.cancel_job(session, principal, job_id)
    _retry_after(response, job, settings.retry_after_seconds)
    return job_out(job, _version_number(session, job))


@router.get(
    "/{job_id}/report",
    response_model=UnlearningReport,
    responses={
        200: {
            "description": "The report, signed: verify it offline with `negmerge admin report "
            "verify FILE` or against GET /v1/report-signing-key."
        },
        **errors(*AUTH_ERRORS, 404, 422),
    },
    summary="The evidence report of a job",
)
def get_report(
    job_id: uuid.UUID, principal: Reader, session: DbSession, settings: SettingsDep
) -> Response:
    """Who asked and when (key and tenant by name), what was forgotten, the models by name
    and every hash, the lambda curve, kept fraction, metrics before and after with their
    units, the verdict, the audit chain's head at the end and every state change; signed
    (Ed25519) over its canonical JSON."""
    body = reports.signed_report(
        session, principal.tenant_id, job_id, signer_for(settings.report_signing_key_file)
    )
    return Response(body, media_type="application/json")


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment
