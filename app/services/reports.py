"""A job's evidence report: what a compliance team files, built from the job's row, its
result, the rows it names (requester, tenant, data set, model versions) and the audit chain,
then signed (app.services.report_signing).

The report is assembled from sections: each is one function below, registered with
`@section`, that fills its field(s) of UnlearningReport from the job. Adding a section is one
such function and its field in the schema.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import UnlearningJob
from app.db.repositories import (
    ApiKeyRepository,
    DatasetRepository,
    JobRepository,
    ModelRepository,
    TenantRepository,
)
from app.schemas.jobs import (
    REPORT_UNITS,
    DeletionRequestRecord,
    JobError,
    ReportAudit,
    ReportForgetSet,
    ReportHashes,
    ReportModel,
    ReportRequester,
    TimelineEvent,
    UnlearningReport,
)
from app.schemas.results import JobResult
from app.services import audit
from app.services.deletion_requests import requests_of_job
from app.services.job_states import get_job
from app.services.report_signing import ReportSigner
from app.services.results import data_deletion
from negmerge.verdict import Target, resolve_target, target_kind


@dataclass(frozen=True)
class ReportContext:
    session: Session
    job: UnlearningJob

    @cached_property
    def result(self) -> JobResult | None:
        return JobResult.of(self.job.result)

    @property
    def models(self) -> ModelRepository:
        return ModelRepository(self.session, self.job.tenant_id)


Section = Callable[[ReportContext], dict[str, Any]]
SECTIONS: list[Section] = []


def section(build: Section) -> Section:
    """Register a section: a function returning its fields of the report."""
    SECTIONS.append(build)
    return build


def build_report(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> UnlearningReport:
    """The tenant's job's report (NotFound for another tenant's or an unknown job)."""
    context = ReportContext(session, get_job(session, tenant_id, job_id))
    fields: dict[str, Any] = {}
    for build in SECTIONS:
        fields.update(build(context))
    return UnlearningReport.model_validate(fields)


def signed_report(
    session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, signer: ReportSigner
) -> bytes:
    """The report as JSON bytes with its signature: what the API and the dashboard serve, so
    the file downloaded is exactly what was signed."""
    report = build_report(session, tenant_id, job_id)
    body = report.model_dump(mode="json", by_alias=True, exclude={"signature"})
    return json.dumps(signer.sign(body), indent=2, ensure_ascii=False).encode()


@section
def _job(ctx: ReportContext) -> dict[str, Any]:
    job = ctx.job
    error = None
    if job.error_code:
        error = JobError(code=job.error_code, message=job.error_message or "")
    return {
        "job_id": job.id,
        "state": job.state,
        "final": job.state.is_terminal,
        "error": error,
        "request": job.request,
        "units": REPORT_UNITS,
    }


@section
def _requester(ctx: ReportContext) -> dict[str, Any]:
    job = ctx.job
    tenant = TenantRepository(ctx.session).get(job.tenant_id)
    key = (
        ApiKeyRepository(ctx.session).of_tenant(job.tenant_id, job.created_by_key_id)
        if job.created_by_key_id
        else None
    )
    requester = ReportRequester(
        tenant_id=job.tenant_id,
        tenant_name=tenant.name if tenant else "",
        api_key_id=job.created_by_key_id,
        api_key_name=key.name if key else None,
        requested_at=job.created_at,
        subject_reference=job.subject_reference,
        legal_basis=job.legal_basis,
    )
    return {"requested_by": requester}


@section
def _forgotten(ctx: ReportContext) -> dict[str, Any]:
    job = ctx.job
    dataset = DatasetRepository(ctx.session, job.tenant_id).get(job.forget_dataset_id)
    selection = {k: job.request["forget"].get(k) for k in ("ids", "classes")}
    forgotten = ReportForgetSet(
        dataset_id=job.forget_dataset_id,
        dataset_name=dataset.name if dataset else "",
        count=job.forget_count,
        manifest_sha256=job.forget_manifest_sha256,
        classes=selection["classes"],
        ids=selection["ids"],
    )
    return {"forgotten": forgotten, "forget_selection": selection}


@section
def _models(ctx: ReportContext) -> dict[str, Any]:
    job = ctx.job
    model = ctx.models.get(job.model_id)
    name = model.name if model else None
    base = ctx.models.version_by_id(job.model_version_id)
    stored = ctx.result.model if ctx.result else None
    unlearned = (
        ReportModel.model_validate({**stored.model_dump(), "model_name": name}) if stored else None
    )
    return {
        "base_model": ReportModel(
            model_id=job.model_id,
            model_name=name,
            version=base.version if base else 0,
            version_id=base.id if base else None,
            weights_sha256=base.weights_sha256 if base else "",
        ),
        "unlearned_model": unlearned,
    }


@section
def _hashes(ctx: ReportContext) -> dict[str, Any]:
    """As the job resource's result has them (the base's: its version's until there is one)."""
    result, job = ctx.result, ctx.job
    base = result.base_model_sha256 if result else None
    if base is None:
        version = ctx.models.version_by_id(job.model_version_id)
        base = version.weights_sha256 if version else None
    hashes = ReportHashes(
        forget_manifest_sha256=job.forget_manifest_sha256,
        base_model_sha256=base,
        task_vector_sha256=result.task_vector_sha256 if result else None,
        merged_sha256=result.merged_sha256 if result else None,
        unlearned_model_sha256=result.model.weights_sha256 if result and result.model else None,
    )
    return {"hashes": hashes}


@section
def _outcome(ctx: ReportContext) -> dict[str, Any]:
    result = ctx.result
    target, default_target = _target(ctx.job)
    found = {"target": target, "default_target": default_target}
    if result is None:  # the job has not finished: the rest is null
        return found
    return {
        **found,
        "lambda": result.lambda_,
        "kept_fraction": result.kept_fraction,
        "lambda_curve": result.lambda_curve,
        "metrics": result.metrics,
        "code_version": result.code_version,
        "seeds": result.seeds,
        "rounds": result.rounds,
        "verdict": result.verdict,
    }


@section
def _audit(ctx: ReportContext) -> dict[str, Any]:
    job = ctx.job
    trail = ReportAudit(
        chain=audit.chain_of(job.tenant_id),
        head_seq_at_end=job.audit_seq_at_end,
        head_hash_at_end=job.audit_head_at_end,
        entries=f"/v1/audit?resource_id={job.id}",
    )
    return {"audit": trail}


@section
def _data_deletion(ctx: ReportContext) -> dict[str, Any]:
    return {"data_deletion": data_deletion(ctx.job)}


@section
def _requests(ctx: ReportContext) -> dict[str, Any]:
    """The deletion requests the job carries, as the API shows them (without its links)."""
    keep = set(DeletionRequestRecord.model_fields)
    return {
        "requests": [
            DeletionRequestRecord.model_validate(view.model_dump(include=keep))
            for view in requests_of_job(ctx.session, ctx.job)
        ]
    }


@section
def _timeline(ctx: ReportContext) -> dict[str, Any]:
    events = JobRepository(ctx.session, ctx.job.tenant_id).events(ctx.job.id)
    timeline = [
        TimelineEvent(at=e.at, kind=e.kind, state=e.state, stage=e.stage, details=e.details)
        for e in events
    ]
    return {"timeline": timeline}


def _target(job: UnlearningJob) -> tuple[Target, bool]:
    """The target the job is judged by, from the spec the workers run (as JobSpec.
    resolved_target works it out, without validating the whole spec)."""
    spec = job.spec or {}
    stated = spec.get("target")
    forget = spec.get("forget") or {}
    return resolve_target(
        Target.model_validate(stated) if stated else None,
        target_kind(forget.get("classes"), forget.get("ids")),
        (spec.get("search") or {}).get("retain_ratio", 0.95),
    )
