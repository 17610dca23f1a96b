"""Accepting an unlearning job: a deletion request, checked and queued.

A request is validated completely before it is accepted (the model, the data, the forget
set, the variant grid, the merge method's parameters), using the library's own rules, so a
job that is QUEUED can run. Its first step is sent to the broker only after the row is
committed. From there the job moves by app.services.job_states.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth import Principal
from app.db.models import Dataset, JobEvent, JobState, Model, ModelVersion, UnlearningJob
from app.db.repositories import DatasetRepository, JobRepository, ModelRepository
from app.db.session import after_commit
from app.errors import (
    Conflict,
    IdempotencyMismatch,
    InvalidRequest,
    from_validation_error,
    named_part,
)
from app.queue import FIRST_STEP, JobQueue
from app.schemas.jobs import UnlearningJobCreate
from app.schemas.results import JobResult
from app.services import audit, quotas, retention, webhook_endpoints
from app.services.bounds import check_job_size
from app.settings import Settings
from app.storage import local_path
from negmerge.data import MANIFEST_NAMES, Manifest
from negmerge.errors import DataError, MergeError
from negmerge.job_spec import DataRef, ForgetSpec, JobSpec, SampleGroup, make_splits
from negmerge.merge import get_method
from negmerge.models import ModelSpec


def request_sha256(body: UnlearningJobCreate) -> str:
    """A hash of the request's meaning: the same JSON written differently hashes the same."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Submission:
    job: UnlearningJob
    created: bool  # False: an earlier request with the same Idempotency-Key


def submit_job(
    session: Session,
    principal: Principal,
    body: UnlearningJobCreate,
    idempotency_key: str | None,
    settings: Settings,
    queue: JobQueue,
    *,
    groups: dict[str, SampleGroup] | None = None,
) -> Submission:
    """Accept a deletion request as a QUEUED job (or find the one this key already made)."""
    repo = JobRepository(session, principal.tenant_id)
    digest = request_sha256(body)
    if idempotency_key is not None:
        existing = repo.get_by_idempotency_key(idempotency_key)
        if existing is not None:
            return Submission(_same_request(existing, digest), created=False)

    job = _resolve(session, principal, body, settings, groups or {})
    if not body.allow_repeat:
        _refuse_repeat(repo, job)
    if body.webhook_url is not None:
        webhook_endpoints.check_url(str(body.webhook_url), "webhook_url", settings)
    # The quotas last, with the tenant locked: the slow checks above run concurrently, the
    # counting one submission at a time. A request with this key may have committed while
    # this one waited for the lock: it is answered, not counted again.
    tenant = quotas.lock_tenant(session, principal)
    if idempotency_key is not None:
        existing = repo.get_by_idempotency_key(idempotency_key)
        if existing is not None:
            return Submission(_same_request(existing, digest), created=False)
    base = ModelRepository(session, principal.tenant_id).version_by_id(job.model_version_id)
    quotas.admit_job(session, tenant, base.size_bytes if base else 0, settings)
    job.idempotency_key = idempotency_key
    job.request_sha256 = digest
    job.created_by_key_id = principal.key_id
    try:
        # Concurrent requests with one key: the unique index makes all but one wait for the
        # first to commit and then fail here; they answer with the first one's job.
        with session.begin_nested():
            repo.add(job)
    except IntegrityError:
        existing = repo.get_by_idempotency_key(idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return Submission(_same_request(existing, digest), created=False)

    repo.add_event(JobEvent(job_id=job.id, kind="state", state=JobState.QUEUED, details={}))
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="job.created",
        resource_type="unlearning_job",
        resource_id=job.id,
        details={
            "model_id": str(job.model_id),
            "model_version_id": str(job.model_version_id),
            "forget_dataset_id": str(job.forget_dataset_id),
            "forget_count": job.forget_count,
            "forget_manifest_sha256": job.forget_manifest_sha256,
            "subject_reference": job.subject_reference,
            "request_sha256": digest,
            "state": JobState.QUEUED.value,
        },
    )
    job_id = job.id
    after_commit(session, lambda: queue.send_step(job_id, FIRST_STEP))
    return Submission(job, created=True)


def _refuse_repeat(repo: JobRepository, job: UnlearningJob) -> None:
    """A second job for the same forget set on the model's lineage, while the first is going
    or after it met its target, would unlearn what is already gone and make another version:
    refused, naming the first (allow_repeat asks for it anyway). A job that failed, was
    cancelled or missed its target leaves the data unforgotten: another is welcome."""
    for earlier in repo.same_forget_set(job.model_id, job.forget_manifest_sha256):
        result = JobResult.of(earlier.result)
        if not earlier.state.is_terminal or (
            earlier.state is JobState.SUCCEEDED and result is not None and result.met
        ):
            done = "is under way" if not earlier.state.is_terminal else "has already forgotten it"
            raise Conflict(
                f"forget: job {earlier.id} on this model with the same forget set {done} "
                f"({earlier.state.value}); GET /v1/unlearning-jobs/{earlier.id}, or send "
                '"allow_repeat": true to unlearn it again'
            )


def _same_request(existing: UnlearningJob, digest: str) -> UnlearningJob:
    if existing.request_sha256 != digest:
        raise IdempotencyMismatch(
            f"Idempotency-Key: already used by job {existing.id}, submitted with a different "
            f"request body; use a new key, or GET /v1/unlearning-jobs/{existing.id} to see it"
        )
    return existing


def _resolve(
    session: Session,
    principal: Principal,
    body: UnlearningJobCreate,
    settings: Settings,
    groups: dict[str, SampleGroup],
) -> UnlearningJob:
    """Check the request against the tenant's models and data and the library's rules, and
    build the job row with the JobSpec the workers will run."""
    models = ModelRepository(session, principal.tenant_id)
    model = models.get(body.model.id)
    if model is None:
        raise InvalidRequest("model.id", "no such model")
    number = body.model.version or model.latest_version
    version = models.version(model.id, number)
    if version is None:
        raise InvalidRequest(
            "model.version", f"the model has no version {number} (latest: {model.latest_version})"
        )
    retention.check_base(session, version, settings)
    check_same_mode(body.finetuning, version)
    datasets = DatasetRepository(session, principal.tenant_id)
    forget_ds = _live_dataset(datasets, body.forget.dataset_id, "forget.dataset_id")
    retain_ds = None
    if body.retain is not None:
        retain_ds = _live_dataset(datasets, body.retain.dataset_id, "retain.dataset_id")

    forget_manifest = load_manifest(forget_ds, model, "forget.dataset_id")
    retain_manifest = load_manifest(retain_ds, model, "retain.dataset_id") if retain_ds else None
    try:
        chosen = forget_manifest.select(ids=body.forget.ids, classes=body.forget.classes)
    except DataError as exc:
        raise data_problem(exc, "forget", forget_ds) from None
    if not chosen:
        raise InvalidRequest("forget", "the forget set is empty")

    spec = _job_spec(body, model, version, forget_ds, retain_ds, groups)
    variants = spec.variant_list()
    n = len(variants)
    try:
        splits = make_splits(spec, forget_manifest, retain_manifest or forget_manifest)
    except DataError as exc:
        raise data_problem(exc, "forget", forget_ds, retain_ds) from None
    check_job_size(spec, len(splits["forget"]), settings)
    try:  # with escalation `more`, the last round merges every round's variants
        largest = len(spec.escalation.merged_indices(n, spec.escalation.rounds))
        get_method(spec.merge.method, largest, **spec.merge.params)
    except MergeError as exc:
        field = "merge.method" if "unknown" in str(exc) else "merge.params"
        raise InvalidRequest(field, str(exc)) from None

    return UnlearningJob(
        model_id=model.id,
        model_version_id=version.id,
        forget_dataset_id=forget_ds.id,
        retain_dataset_id=retain_ds.id if retain_ds else None,
        state=JobState.QUEUED,
        variants_total=n,
        subject_reference=body.subject_reference,
        legal_basis=body.legal_basis,
        webhook_url=str(body.webhook_url) if body.webhook_url else None,
        request=body.model_dump(mode="json", by_alias=True),
        spec=json.loads(spec.model_dump_json()),
        forget_manifest_sha256=forget_manifest.sha256(chosen),
        forget_count=len(chosen),
    )


def _live_dataset(datasets: DatasetRepository, dataset_id: uuid.UUID, field: str) -> Dataset:
    dataset = datasets.get(dataset_id)
    if dataset is None:
        raise InvalidRequest(field, "no such data set")
    if dataset.deleted_at is not None:
        raise InvalidRequest(
            field,
            f"data set {dataset.name!r} was deleted at {dataset.deleted_at.isoformat()} "
            f"({dataset.deletion_reason}); its files are gone",
        )
    return dataset


def check_same_mode(finetuning: str, version: ModelVersion) -> None:
    """One lineage, one mode. A linearized version's forward is the tangent model around its
    theta0: standard fine-tuning would train the plain network at theta0 and drop every
    earlier deletion's delta. A linear job's tangent space is taken at registered weights
    (or continues a linearized version's), never around a model that standard unlearning
    already changed, so that every version of a linear lineage is theta0 of the registered
    model plus one delta that the reports add up to."""
    if version.finetuning == finetuning:
        return
    if version.finetuning == "linear":
        raise InvalidRequest(
            "finetuning",
            f"version {version.version} is a linearized model (made by a linear job); a "
            "standard job cannot fine-tune it: use finetuning 'linear', or a standard version",
        )
    if version.produced_by_job_id is not None:
        raise InvalidRequest(
            "finetuning",
            f"version {version.version} was made by a standard job; a linear job starts from "
            "registered weights or a linearized version (one lineage, one mode): use "
            "finetuning 'standard', or choose such a version",
        )


def load_manifest(dataset: Dataset, model: Model, field: str) -> Manifest:
    try:
        manifest = Manifest.load(dataset.manifest_uri, dataset.root_uri)
        manifest.check_labels(model.classes)
    except DataError as exc:
        raise InvalidRequest(field, _without_paths(str(exc), dataset)) from None
    return manifest


def _without_paths(message: str, *datasets: Dataset | None) -> str:
    """The library names a manifest by its path; answers name the data set by its name and id
    (an uploaded one lives under the server's artifact root, which is not the caller's
    business)."""
    for dataset in datasets:
        if dataset is not None:
            manifest = re.escape(dataset.manifest_uri.rstrip("/"))
            names = "|".join(re.escape(name) for name in MANIFEST_NAMES)
            pattern = rf"{manifest}(/({names}))?"
            named = f"data set {dataset.name!r} ({dataset.id})"
            message = re.sub(pattern, lambda _match, named=named: named, message)
    return message


def data_problem(exc: DataError, default_field: str, *datasets: Dataset | None) -> InvalidRequest:
    """The library's DataError messages start with the part at fault ('ids: ...')."""
    message = _without_paths(str(exc), *datasets)
    head, rest = named_part(message)
    fields = {
        "ids": "forget.ids",
        "classes": "forget.classes",
        "forget": "forget",
        "retain": "retain",
        "search.rule": "search.rule",
        "target": "target",
        "groups": "forget",
    }
    if head in fields and rest:
        return InvalidRequest(fields[head], rest)
    return InvalidRequest(default_field, message)


def _job_spec(
    body: UnlearningJobCreate,
    model: Model,
    version: ModelVersion,
    forget_ds: Dataset,
    retain_ds: Dataset | None,
    groups: dict[str, SampleGroup],
) -> JobSpec:
    weights = version.weights_uri
    weights = (
        str(local_path(weights))
        if "://" not in weights or weights.startswith("file://")
        else weights
    )
    try:
        return JobSpec(
            model=ModelSpec(
                family=model.family,
                architecture=model.architecture,
                classes=model.classes,
                weights=weights,
                **model.spec,
            ),
            forget=ForgetSpec(
                dataset=forget_ds.manifest_uri,
                root=forget_ds.root_uri,
                ids=body.forget.ids,
                classes=body.forget.classes,
            ),
            retain=DataRef(dataset=retain_ds.manifest_uri, root=retain_ds.root_uri)
            if retain_ds
            else None,
            variants=body.variants,
            merge=body.merge,
            search=body.search,
            target=body.target,
            escalation=body.escalation,
            seed=body.seed,
            max_eval_samples=body.max_eval_samples,
            finetuning=body.finetuning,
            groups=groups,
        )
    except ValidationError as exc:
        raise from_validation_error(exc) from None
