"""Deletion requests: one data subject's, received, recognised when they repeat one already
held, batched into unlearning jobs by the model's policy, and settled when their job ends.

Lifecycle: PENDING -> BATCHED (a job carries it) -> FORGOTTEN (the job SUCCEEDED and met its
target) or NOT_FORGOTTEN (SUCCEEDED, target missed). A job that FAILED or was CANCELLED puts
its requests back to PENDING, for the next batch; after deletion_request_max_attempts jobs
they are FAILED. A PENDING request can be CANCELLED (withdrawn).

A model's batches run one at a time: the next starts from the version the previous one made
(the latest), so every version carries all the requests before it. Batches are made under
the model's row lock, and a batch's Idempotency-Key is derived from its requests and their
attempt, so neither a crash nor two batchers at once make two jobs for the same requests.
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.auth import Principal
from app.db.base import utcnow
from app.db.deletion_repositories import (
    DeletionPolicyRepository,
    DeletionRequestRepository,
)
from app.db.models import (
    DeletionPolicy,
    DeletionRequest,
    DeletionRequestState,
    JobState,
    Model,
    UnlearningJob,
)
from app.db.repositories import DatasetRepository, ModelRepository
from app.errors import ApiError, Conflict, InvalidRequest, NotFound, from_validation_error
from app.queue import JobQueue
from app.schemas.deletion_requests import (
    DeletionPolicyPut,
    DeletionRequestCreate,
    DeletionRequestLinks,
    DeletionRequestOut,
    RequestEvidence,
)
from app.schemas.jobs import UnlearningJobCreate
from app.schemas.results import JobResult
from app.services import audit, job_submission
from app.services.datasets import image_sha256
from app.settings import Settings
from negmerge.errors import DataError
from negmerge.job_spec import SampleGroup

log = logging.getLogger(__name__)

RESOURCE = "deletion_request"
CLOCK_SKEW = timedelta(minutes=5)  # a sender's clock a little ahead is not an error


def add_months(moment: datetime, months: int) -> datetime:
    """`moment` plus calendar months; a day the target month lacks becomes its last day
    (31 January + 1 month = 28 or 29 February)."""
    month = moment.month - 1 + months
    year, month = moment.year + month // 12, month % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def create_request(
    session: Session,
    principal: Principal,
    body: DeletionRequestCreate,
    settings: Settings,
    queue: JobQueue,
) -> tuple[DeletionRequest, DeletionRequest | None]:
    """Accept a request; or, if the model's lineage already holds every sample it names
    (pending, batched or forgotten), answer with that earlier request: (request, None) when
    new, (earlier, earlier) for a duplicate. A request of which only some samples are held
    is refused (409), naming the requests that hold them."""
    model = ModelRepository(session, principal.tenant_id).get(body.model_id, for_update=True)
    if model is None:  # locked: requests for one model are checked one at a time
        raise InvalidRequest("model_id", "no such model")
    dataset = DatasetRepository(session, principal.tenant_id).get(body.dataset_id)
    if dataset is None:
        raise InvalidRequest("dataset_id", "no such data set")
    manifest = job_submission.load_manifest(dataset, model, "dataset_id")
    if body.ids is not None and len(set(body.ids)) > settings.deletion_request_max_samples:
        raise InvalidRequest(
            "ids", f"more than {settings.deletion_request_max_samples} samples in one request"
        )
    try:
        chosen = manifest.select(ids=body.ids, classes=body.classes)
    except DataError as exc:
        raise _data_problem(exc, dataset) from None
    if not chosen:
        raise InvalidRequest("classes", "no samples of these classes in the data set")
    if body.ids is not None:
        try:  # the image's bytes: a re-uploaded data set's copy is the same sample
            keys = sorted(
                {"sha256:" + image_sha256(manifest, s, settings.max_image_pixels) for s in chosen}
            )
        except DataError as exc:
            raise _data_problem(exc, dataset) from None
    else:
        keys = sorted({class_key(name) for name in body.classes or ()})

    repo = DeletionRequestRepository(session, principal.tenant_id)
    holding = repo.holding(model.id, keys)
    if holding:
        held = sum(holding.values())
        earlier = [repo.get(request_id) for request_id in holding]
        if held == len(keys):
            first = min((r for r in earlier if r), key=lambda r: r.created_at)
            return first, first
        named = ", ".join(sorted(str(r.id) for r in earlier if r))
        raise Conflict(
            f"ids: {held} of the {len(keys)} samples are already requested on this model "
            f"(deletion requests {named}); send the others in a request of their own"
        )

    received = body.received_at or utcnow()
    if received > utcnow() + CLOCK_SKEW:
        raise InvalidRequest("received_at", "in the future")
    request = repo.add(
        DeletionRequest(
            model_id=model.id,
            dataset_id=dataset.id,
            subject_reference=body.subject_reference,
            legal_basis=body.legal_basis,
            ids=list(dict.fromkeys(body.ids)) if body.ids is not None else None,
            classes=list(dict.fromkeys(body.classes)) if body.classes is not None else None,
            sample_count=len(chosen),
            state=DeletionRequestState.PENDING,
            received_at=received,
            due_at=body.due_at or add_months(received, settings.deletion_request_due_months),
            created_by_key_id=principal.key_id,
            attempts=0,
        )
    )
    repo.add_samples(request, keys)
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="deletion_request.created",
        resource_type=RESOURCE,
        resource_id=request.id,
        details={
            "model_id": str(model.id),
            "dataset_id": str(dataset.id),
            "subject_reference": request.subject_reference,
            "sample_count": request.sample_count,
            "due_at": request.due_at.isoformat(),
        },
    )
    policy = DeletionPolicyRepository(session, principal.tenant_id).get(model.id)
    if policy is not None and policy.mode == "count":
        batch_if_due(session, principal.tenant_id, model.id, settings, queue, utcnow())
    return request, None


def _data_problem(exc: DataError, dataset) -> InvalidRequest:  # type: ignore[no-untyped-def]
    """The jobs' reading of a library error, with this body's field names (no `forget.`)."""
    problem = job_submission.data_problem(exc, "ids", dataset).fields[0]
    return InvalidRequest(problem.field.removeprefix("forget."), problem.problem)


def class_key(name: str) -> str:
    """A class's sample key: its name's hash (any length of name fits the column)."""
    return "class:" + hashlib.sha256(name.encode()).hexdigest()


# A request in one of these has nothing left to happen: it can no longer be overdue.
SETTLED = (
    DeletionRequestState.FORGOTTEN,
    DeletionRequestState.NOT_FORGOTTEN,
    DeletionRequestState.FAILED,
    DeletionRequestState.CANCELLED,
)


def request_view(
    session: Session, request: DeletionRequest, duplicate_of: uuid.UUID | None = None
) -> DeletionRequestOut:
    """The request as the API, the report and the dashboard show it."""
    version = (
        ModelRepository(session, request.tenant_id).version_by_id(request.model_version_id)
        if request.model_version_id
        else None
    )
    number = version.version if version is not None else None
    return DeletionRequestOut(
        id=request.id,
        state=request.state,
        model_id=request.model_id,
        dataset_id=request.dataset_id,
        ids=request.ids,
        classes=request.classes,
        sample_count=request.sample_count,
        subject_reference=request.subject_reference,
        legal_basis=request.legal_basis,
        received_at=request.received_at,
        due_at=request.due_at,
        overdue=request.state not in SETTLED and request.due_at < utcnow(),
        job_id=request.job_id,
        attempts=request.attempts,
        model_version=number,
        evidence=RequestEvidence.model_validate(request.evidence) if request.evidence else None,
        duplicate_of=duplicate_of,
        created_at=request.created_at,
        updated_at=request.updated_at,
        finished_at=request.finished_at,
        links=DeletionRequestLinks(
            self=f"/v1/deletion-requests/{request.id}",
            job=f"/v1/unlearning-jobs/{request.job_id}" if request.job_id else None,
            model_version=f"/v1/models/{request.model_id}/versions/{number}" if number else None,
        ),
    )


def requests_of_job(session: Session, job: UnlearningJob) -> list[DeletionRequestOut]:
    """The requests the job carries (or carried), oldest first."""
    repo = DeletionRequestRepository(session, job.tenant_id)
    return [request_view(session, r) for r in repo.of_job(job.id)]


def get_request(session: Session, tenant_id: uuid.UUID, request_id: uuid.UUID) -> DeletionRequest:
    found = DeletionRequestRepository(session, tenant_id).get(request_id)
    if found is None:
        raise NotFound(f"deletion request {request_id} not found")
    return found


def cancel_request(
    session: Session, principal: Principal, request_id: uuid.UUID
) -> DeletionRequest:
    """Withdraw a PENDING request; one a job carries (or has settled) answers 409."""
    request = DeletionRequestRepository(session, principal.tenant_id).get(
        request_id, for_update=True
    )
    if request is None:
        raise NotFound(f"deletion request {request_id} not found")
    if request.state is not DeletionRequestState.PENDING:
        raise Conflict(f"state: only a PENDING request can be cancelled ({request.state.value})")
    _move(session, request, DeletionRequestState.CANCELLED, principal.actor, utcnow())
    return request


# ---- policies --------------------------------------------------------------------------------


def put_policy(
    session: Session, principal: Principal, model_id: uuid.UUID, body: DeletionPolicyPut
) -> DeletionPolicy:
    """Set the model's batching policy and its jobs' settings."""
    model = ModelRepository(session, principal.tenant_id).get(model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    repo = DeletionPolicyRepository(session, principal.tenant_id)
    policy = repo.get(model.id) or repo.add(
        DeletionPolicy(
            model_id=model.id, mode=body.mode, job_template={}, updated_by_key_id=principal.key_id
        )  # fmt: skip
    )
    policy.mode = body.mode
    policy.batch_size = body.batch_size if body.mode == "count" else None
    policy.window_seconds = body.window_seconds if body.mode == "window" else None
    policy.job_template = body.job.model_dump(mode="json", exclude_unset=True)
    policy.updated_by_key_id = principal.key_id
    policy.last_batch_error = None
    policy.updated_at = utcnow()
    session.flush()
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="deletion_policy.set",
        resource_type="model",
        resource_id=model.id,
        details={
            "mode": policy.mode,
            "batch_size": policy.batch_size,
            "window_seconds": policy.window_seconds,
        },  # fmt: skip
    )
    return policy


def get_policy(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> DeletionPolicy:
    policy = DeletionPolicyRepository(session, tenant_id).get(model_id)
    if policy is None:
        raise NotFound(f"model {model_id} has no deletion policy")
    return policy


# ---- batching --------------------------------------------------------------------------------


def batch_now(
    session: Session,
    principal: Principal,
    model_id: uuid.UUID,
    settings: Settings,
    queue: JobQueue,
) -> tuple[UnlearningJob | None, list[DeletionRequest]]:
    """Batch the model's pending requests now, whatever its policy (POST ...:batch): the job
    and its requests; or None and the requests FAILED because their jobs failed too often,
    when no other is pending. Errors reach the caller: a job of the model's still running
    (409), nothing pending (409), a template that does not fit (422)."""
    model, policy = _lock_model(session, principal.tenant_id, model_id)
    if policy is None:
        raise Conflict(
            f"model {model_id} has no deletion policy: PUT /v1/models/{model_id}/"
            "deletion-policy first (it gives the jobs' settings)"
        )
    running = _running_batch(session, principal.tenant_id, model.id)
    if running is not None:
        raise Conflict(
            f"state: job {running} of this model's deletion requests is still running; the "
            "next batch starts from the version it makes"
        )
    group, failed = _next_group(session, principal.tenant_id, model.id, settings, utcnow())
    if failed and not group:  # answered, not raised: their FAILED state is committed
        return None, failed
    if not group:
        raise Conflict("state: no pending deletion requests for this model")
    return _submit(session, principal, model, policy, group, settings, queue), group


def batch_if_due(
    session: Session,
    tenant_id: uuid.UUID,
    model_id: uuid.UUID,
    settings: Settings,
    queue: JobQueue,
    now: datetime,
) -> UnlearningJob | None:
    """Start a batch if the model's count or window policy says one is due and no batch of
    the model is running. What refuses the job (a quota, a template that no longer fits) is
    kept on the policy and tried again at the next check; the request itself never fails."""
    model, policy = _lock_model(session, tenant_id, model_id)
    if policy is None or policy.mode == "manual":
        return None
    if _running_batch(session, tenant_id, model.id) is not None:
        return None
    group, _failed = _next_group(session, tenant_id, model.id, settings, now)
    if not group:
        return None
    if policy.mode == "count" and len(group) < (policy.batch_size or 1):
        return None
    if policy.mode == "window" and now < group[0].created_at + timedelta(
        seconds=policy.window_seconds or 0
    ):
        return None
    principal = Principal(tenant_id, policy.updated_by_key_id, frozenset({"jobs:write"}))
    try:
        with session.begin_nested():
            job = _submit(session, principal, model, policy, group, settings, queue)
    except ApiError as exc:
        policy.last_batch_error = str(exc)[:2000]
        log.warning("deletion batch of model %s not started: %s", model_id, exc)
        return None
    policy.last_batch_error = None
    return job


def _lock_model(
    session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID
) -> tuple[Model, DeletionPolicy | None]:
    # The model's row lock serialises its batches (and its requests' duplicate checks).
    model = ModelRepository(session, tenant_id).get(model_id, for_update=True)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model, DeletionPolicyRepository(session, tenant_id).get(model.id)


def _running_batch(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> uuid.UUID | None:
    batched = DeletionRequestRepository(session, tenant_id).of_model(
        model_id, DeletionRequestState.BATCHED
    )
    return batched[0].job_id if batched else None


def _next_group(
    session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID, settings: Settings, now: datetime
) -> tuple[list[DeletionRequest], list[DeletionRequest]]:
    """The pending requests that go into the next job: those with the oldest one's data set
    and kind (ids or classes: a job forgets one or the other), oldest first; and the requests
    whose jobs failed too often, FAILED here instead."""
    pending = DeletionRequestRepository(session, tenant_id).of_model(
        model_id, DeletionRequestState.PENDING, for_update=True
    )
    usable, failed = [], []
    for request in pending:
        if request.attempts >= settings.deletion_request_max_attempts:
            _move(session, request, DeletionRequestState.FAILED, "system:batcher", now,
                  {"attempts": request.attempts})  # fmt: skip
            failed.append(request)
        else:
            usable.append(request)
    if not usable:
        return [], failed
    first = usable[0]
    group = [
        r
        for r in usable
        if r.dataset_id == first.dataset_id and (r.ids is None) == (first.ids is None)
    ]
    return group, failed


def _submit(
    session: Session,
    principal: Principal,
    model: Model,
    policy: DeletionPolicy,
    group: list[DeletionRequest],
    settings: Settings,
    queue: JobQueue,
) -> UnlearningJob:
    """Submit the job that forgets the union of `group` through the same path as POST
    /v1/unlearning-jobs (checks, bounds, quotas), and mark the requests BATCHED."""
    if group[0].ids is not None:
        forget: dict[str, Any] = {"ids": list(dict.fromkeys(i for r in group for i in r.ids))}
    else:
        forget = {"classes": list(dict.fromkeys(c for r in group for c in r.classes or ()))}
    references = ", ".join(r.subject_reference for r in group)
    bases = {r.legal_basis for r in group}
    try:
        body = UnlearningJobCreate.model_validate(
            {
                **policy.job_template,
                "model": {"id": str(model.id)},
                "forget": {"dataset_id": str(group[0].dataset_id), **forget},
                "subject_reference": references[:197] + "..."
                if len(references) > 200
                else references,
                "legal_basis": bases.pop() if len(bases) == 1 else None,
                # Each request's samples were checked against the lineage when it came in.
                "allow_repeat": True,
            }
        )
    except ValidationError as exc:
        raise from_validation_error(exc, "job.") from None
    groups = {
        str(r.id): SampleGroup(ids=r.ids) if r.ids is not None else SampleGroup(classes=r.classes)
        for r in group
    }
    # The same requests at the same attempt give the same key: a second batcher's submission
    # is answered with the first one's job.
    key = hashlib.sha256("\n".join(f"{r.id}:{r.attempts}" for r in group).encode()).hexdigest()
    submission = job_submission.submit_job(
        session, principal, body, f"deletion-batch:{key}", settings, queue, groups=groups
    )
    job = submission.job
    now = utcnow()
    for request in group:
        request.job_id = job.id
        request.attempts += 1
        _move(session, request, DeletionRequestState.BATCHED, principal.actor, now,
              {"job_id": str(job.id)})  # fmt: skip
    return job


# ---- the job's end ---------------------------------------------------------------------------


def settle_requests(session: Session, job: UnlearningJob, actor: str, now: datetime) -> None:
    """Bring the requests `job` carries to its end (job_states.change_state calls this when the job
    reaches a terminal state, in the same transaction): FORGOTTEN or NOT_FORGOTTEN with their
    own evidence and the version that carries them, or back to PENDING."""
    repo = DeletionRequestRepository(session, job.tenant_id)
    carried = [
        r for r in repo.of_job(job.id, for_update=True) if r.state is DeletionRequestState.BATCHED
    ]
    if not carried:
        return
    result = JobResult.of(job.result)
    model = result.model if result else None
    met = result is not None and result.met
    for request in carried:
        if job.state is JobState.SUCCEEDED:
            evidence = result.groups.get(str(request.id)) if result else None
            request.evidence = evidence.model_dump(mode="json") if evidence else None
            request.model_version_id = model.version_id if model else None
            state = DeletionRequestState.FORGOTTEN if met else DeletionRequestState.NOT_FORGOTTEN
            details = {"job_id": str(job.id), "verdict_met": met,
                       "model_version": model.version if model else None}  # fmt: skip
        else:  # FAILED or CANCELLED: the data is still in the model, the request still owed
            state = DeletionRequestState.PENDING
            details = {"job_id": str(job.id), "job_state": job.state.value}
        _move(session, request, state, actor, now, details)


def _move(
    session: Session,
    request: DeletionRequest,
    state: DeletionRequestState,
    actor: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> None:
    previous = request.state
    request.state = state
    request.updated_at = now
    settled = state in (
        DeletionRequestState.FORGOTTEN,
        DeletionRequestState.NOT_FORGOTTEN,
        DeletionRequestState.FAILED,
        DeletionRequestState.CANCELLED,
    )
    request.finished_at = now if settled else None
    audit.record(
        session,
        tenant_id=request.tenant_id,
        actor=actor,
        action="deletion_request.state_changed",
        resource_type=RESOURCE,
        resource_id=request.id,
        details={"from": previous.value, "to": state.value, **(details or {})},
    )
