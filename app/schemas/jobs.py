"""Unlearning jobs (deletion requests)."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from app.db.models import DeletionRequestState, JobStage, JobState
from app.schemas.common import Strict
from app.schemas.results import JobResult
from negmerge.escalation import Escalation, RoundSummary
from negmerge.job_spec import MergeSpec, SearchSpec
from negmerge.stage_outputs import BeforeAfter, LambdaEvaluated, Seeds
from negmerge.variants import PRESETS, VariantGrid
from negmerge.verdict import DEFAULT_TARGETS, Target, Verdict

# Checked before the library expands the grid: expanding a huge cartesian product to find
# out it is too big would itself be the denial of service.
MAX_GRID_COMBINATIONS = 1024

JOB_EXAMPLE = {
    "model": {"id": "3fa85f64-5717-4562-b3fc-2c963f66afa6"},
    "forget": {
        "dataset_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "ids": ["img-0001", "img-0002"],
    },
    "variants": {"preset": "tiny-classifier"},
    "merge": {"method": "negmerge", "params": {"consensus": 1.0}},
    "search": {"rule": "retain-threshold", "retain_ratio": 0.95},
    "subject_reference": "DSR-2025-0042",
    "legal_basis": "GDPR Art. 17",
}


TARGET_DESCRIPTION = (
    "What counts as forgotten; the job's verdict says whether it was met. Default, by what "
    "the request forgets: "
    + "; ".join(
        f"{kind}: {', '.join(f'{k} {v:g}' for k, v in t.model_dump().items() if v is not None)}"
        for kind, t in DEFAULT_TARGETS.items()
    )
    + " (classes: class; ids: samples; neither: domain). retain_ratio defaults to the "
    "search's. A lambda of 0 is never met."
)


class ModelRef(Strict):
    id: uuid.UUID
    version: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Default: the latest version."
    )


class ForgetRequest(Strict):
    """The forget set: samples by id, whole classes, or (neither) the whole data set."""

    dataset_id: uuid.UUID
    ids: list[str] | None = Field(None, min_length=1, max_length=1_000_000)
    classes: list[str] | None = Field(None, min_length=1, max_length=100_000)


class RetainRequest(Strict):
    dataset_id: uuid.UUID


class JobSettings(Strict):
    """How a job forgets: everything of a job's request but the model, the forget set and the
    subject (a model's deletion policy keeps these for the jobs it makes)."""

    retain: RetainRequest | None = Field(
        None, description="Data whose accuracy must be kept. Default: the forget set's data set."
    )
    variants: VariantGrid = Field(
        description=f"The fine-tuning runs: a preset ({', '.join(PRESETS)}) and/or a grid."
    )
    merge: MergeSpec = Field(default_factory=MergeSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    target: Target | None = Field(None, description=TARGET_DESCRIPTION)
    escalation: Escalation = Field(
        default_factory=Escalation,
        description="Further rounds of fine-tuning when the target is not met, within the "
        "budget given here: `more` variants (all merged) or `longer` ones a round. The job "
        "stops at the first round that meets the target; every round is in the result.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    finetuning: Literal["standard", "linear"] = Field(
        "standard",
        description="standard: fine-tune the model itself. linear: fine-tune, merge, search "
        "lambda and measure in the tangent space of the model (Linear Task Arithmetic); the "
        "new version is a linearized checkpoint (theta0 and the scaled delta), served with "
        "negmerge.models.load_linearized. A version keeps its mode: a standard job cannot run "
        "on a linearized version, nor a linear job on a version a standard job made.",
    )
    max_eval_samples: int | None = Field(2000, gt=0, le=1_000_000)
    keep_task_vectors: bool = Field(
        False,
        description="Keep the n fine-tuned task vectors after the merge and after the job "
        "(default: deleted once merged; their sha256 stay in the report); retention deletes "
        "the job's other intermediates all the same.",
    )
    webhook_url: AnyHttpUrl | None = Field(None, description="Called when the job ends.")

    @field_validator("variants", mode="before")
    @classmethod
    def _grid_size(cls, value: Any) -> Any:
        grid = value.get("grid") if isinstance(value, dict) else None
        if isinstance(grid, dict):
            sizes = [len(v) if isinstance(v, list) else 1 for v in grid.values()]
            if math.prod(sizes) > MAX_GRID_COMBINATIONS:
                raise ValueError(f"grid: more than {MAX_GRID_COMBINATIONS} combinations")
        return value


class UnlearningJobCreate(JobSettings):
    """A deletion request: the model, what to forget, and how."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    model: ModelRef
    forget: ForgetRequest
    subject_reference: str | None = Field(
        None, max_length=200, description="Your reference for the data subject or ticket."
    )
    legal_basis: str | None = Field(None, max_length=200, examples=["GDPR Art. 17"])
    allow_repeat: bool = Field(
        False,
        description="Unlearn this forget set again although a job on this model's lineage "
        "with the same forget set is going or has met its target (otherwise 409 names it).",
    )


class JobProgress(BaseModel):
    variants_done: int = Field(examples=[3])
    variants_total: int = Field(examples=[4])
    lambdas_evaluated: int = Field(examples=[0])
    percent: float = Field(examples=[60.0])
    current_loss: float | None = Field(
        None,
        description="The latest fine-tuning loss a worker reported (absent before any).",
        examples=[0.42],
    )
    images_per_second: float | None = Field(
        None,
        description="The training images per second of the latest fine-tuning step a worker "
        "reported, data loading included (absent before any).",
        examples=[1850.0],
    )

    @classmethod
    def of(cls, job: Any) -> JobProgress:
        """A job's progress, from its row (or any object with the row's attributes)."""
        return cls(
            variants_done=job.variants_done,
            variants_total=job.variants_total,
            lambdas_evaluated=job.lambdas_evaluated,
            percent=job.percent,
            current_loss=job.current_loss,
            images_per_second=job.current_images_per_second,
        )

    @model_serializer(mode="wrap")
    def _omit_unknown_loss(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in ("current_loss", "images_per_second"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class JobError(BaseModel):
    code: str = Field(examples=["data_error"])
    message: str = Field(examples=["sample 'img-7': not a readable image"])


class JobModelRef(BaseModel):
    id: uuid.UUID
    version: int


class JobForgetSet(BaseModel):
    dataset_id: uuid.UUID
    count: int = Field(description="Samples in the forget set.", examples=[2])
    manifest_sha256: str = Field(description="sha256 over the forget set's manifest rows.")


class JobLinks(BaseModel):
    self: str
    report: str
    cancel: str


class DeletedPart(BaseModel):
    deleted: bool = Field(description="Whether its bytes were deleted.")
    files: int = Field(0, description="Files deleted.")
    bytes: int = Field(0, description="Bytes deleted.")
    reason: str | None = Field(None, description="What was deleted, or why it was kept.")


class ForgetDataDeletion(DeletedPart):
    dataset_id: uuid.UUID | None = None
    samples: int = Field(0, description="Samples whose files and manifest rows were deleted.")
    manifest_sha256: str | None = Field(
        None, description="The forget set's hash (ids, paths, labels, splits): kept as evidence."
    )


class DataDeletion(BaseModel):
    """What retention deleted when the job ended (hashes kept, bytes gone, when)."""

    model_config = ConfigDict(extra="allow")

    policy: dict[str, str] = Field(
        description="The retention policy applied: forget_data, intermediates, superseded."
    )
    deleted_at: datetime | None = Field(None, description="When the deletion was recorded.")
    forget_data: ForgetDataDeletion
    intermediates: DeletedPart
    superseded_version: dict[str, Any] | None = Field(
        None, description="With policy superseded=delete: the base version's tombstone."
    )


class UnlearningJobOut(BaseModel):
    id: uuid.UUID
    state: JobState
    stage: JobStage | None = None
    progress: JobProgress
    model: JobModelRef
    forget: JobForgetSet
    subject_reference: str | None = None
    legal_basis: str | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    error: JobError | None = None
    verdict: Verdict | None = Field(
        None,
        description="Once the job has SUCCEEDED: whether it met its target. A SUCCEEDED job "
        "whose verdict is not met ran to the end but did not forget as asked: not a success.",
    )
    result: JobResult | None = None
    data_deletion: DataDeletion | None = Field(
        None,
        description="Retention: what was deleted of the forget data and the job's "
        "intermediates when the job ended (absent until then, and while it is carried out).",
    )
    links: JobLinks


class TimelineEvent(BaseModel):
    at: datetime
    kind: str = Field(examples=["state"])
    state: JobState
    stage: JobStage | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class ReportRequester(BaseModel):
    tenant_id: uuid.UUID
    tenant_name: str = Field(description="The tenant's own name (its label).")
    api_key_id: uuid.UUID | None
    api_key_name: str | None = Field(
        description="The name the API key was given when it was created (null: no key, or "
        "the key is gone)."
    )
    requested_at: datetime
    subject_reference: str | None
    legal_basis: str | None


class ReportForgetSet(JobForgetSet):
    dataset_name: str = Field(description="The forget set's data set, by its name.")
    classes: list[str] | None = Field(None, description="The classes forgotten, if by class.")
    ids: list[str] | None = Field(None, description="The sample ids forgotten, if by sample.")


class ReportModel(BaseModel):
    model_id: uuid.UUID
    model_name: str | None = None
    version: int
    version_id: uuid.UUID | None = None
    weights_sha256: str = Field(description="sha256 of the version's materialised weights.")


class ReportHashes(BaseModel):
    """Every hash of the job, each named as the job resource's `result` names it."""

    forget_manifest_sha256: str
    base_model_sha256: str | None = Field(
        description="The base version's materialised weights (= base_model.weights_sha256)."
    )
    task_vector_sha256: list[str] | None = Field(
        description="Each fine-tuned variant's task vector, in the order they were merged."
    )
    merged_sha256: str | None = Field(description="The merged task vector.")
    unlearned_model_sha256: str | None = Field(
        description="The unlearned version's materialised weights (null: no new version)."
    )


class ReportAudit(BaseModel):
    chain: str = Field(description="The tenant's audit chain (its id).")
    head_seq_at_end: int | None = Field(
        description="The chain's last seq when the job reached its terminal state (null: "
        "not ended yet)."
    )
    head_hash_at_end: str | None = Field(description="That entry's hash: the chain's head then.")
    entries: str = Field(description="Where the job's audit entries are read (audit:read).")


class ReportSignature(BaseModel):
    algorithm: Literal["Ed25519"]
    key_id: str = Field(description="As GET /v1/report-signing-key names the key.")
    value: str = Field(
        description="base64 Ed25519 signature over the report without `signature`, as "
        "canonical JSON (sorted keys, no whitespace, ASCII)."
    )


# The unit of every number in a report, by its path (`*`: every key there). Keys of metrics
# are the job resource's, so the report and `result` never disagree.
REPORT_UNITS = {
    "metrics.*.*_acc": "percent (0-100) of the split's samples classified correctly",
    "metrics.*.mia": "percent (0-100): MIA-efficacy, forget samples an attacker judges non-members",
    "lambda_curve[].*_acc": "percent (0-100), on the validation splits the search uses",
    "lambda": "dimensionless scale: theta = theta_pre - lambda * tau_merged",
    "kept_fraction": "fraction (0-1) of task-vector elements kept by the merge",
    "forgotten.count": "samples",
    "target.forget_acc_max": "percent (0-100)",
    "target.holdout_gap_max": "percentage points",
    "target.mia_min": "percent (0-100)",
    "target.forget_drop_min": "fraction (0-1) of the original's forget accuracy",
    "target.retain_ratio": "fraction (0-1) of the original's accuracy",
    "verdict.checks[].value": "percent (0-100), or percentage points for holdout_gap_max",
    "verdict.checks[].limit": "as verdict.checks[].value",
    "rounds[].finetune_seconds": "seconds",
}


class GroupMetrics(BaseModel):
    count: int = Field(description="The request's samples measured.")
    acc: float | None = Field(None, description="Accuracy on them, percent.")
    true_label_confidence: float | None = Field(
        None, description="Mean probability of their true label, percent."
    )


class RequestEvidence(BaseModel):
    """The request's own samples, measured in the model its job started from and in the new
    version that carries it."""

    before: GroupMetrics
    after: GroupMetrics


class DeletionRequestRecord(BaseModel):
    """A deletion request as the report files it (the API's DeletionRequestOut adds links)."""

    id: uuid.UUID
    state: DeletionRequestState = Field(
        description="PENDING (waiting for a batch), BATCHED (a job carries it), FORGOTTEN "
        "(the job met its target), NOT_FORGOTTEN (the job ended without meeting it: not a "
        "success), FAILED (its jobs failed too often), CANCELLED (withdrawn)."
    )
    model_id: uuid.UUID
    dataset_id: uuid.UUID
    ids: list[str] | None = None
    classes: list[str] | None = None
    sample_count: int = Field(description="Samples the request names (all of a class's).")
    subject_reference: str
    legal_basis: str | None = None
    received_at: datetime
    due_at: datetime
    job_id: uuid.UUID | None = Field(None, description="The job that carries (or last did) it.")
    attempts: int = Field(description="Jobs that have carried it.")
    model_version: int | None = Field(None, description="The version that carries it.")
    evidence: RequestEvidence | None = None
    finished_at: datetime | None = None


class UnlearningReport(BaseModel):
    """The evidence a compliance team files. `final` is true once the job has ended; until
    then the parts the workers have not produced are null. Every report is signed; `units`
    names the unit of each number."""

    job_id: uuid.UUID
    state: JobState
    final: bool
    requested_by: ReportRequester
    forgotten: ReportForgetSet
    forget_selection: dict[str, Any] = Field(description="ids or classes as requested.")
    base_model: ReportModel
    unlearned_model: ReportModel | None = None
    lambda_: float | None = Field(None, alias="lambda")
    kept_fraction: float | None = Field(None, description="Of task-vector elements, 0-1.")
    hashes: ReportHashes
    lambda_curve: list[LambdaEvaluated] | None = Field(
        None, description="The lambda search's evaluations, on the validation splits."
    )
    metrics: BeforeAfter | None = Field(
        None,
        description="before / after, on the report splits (forget, forget_test, retain, "
        "test), and MIA; in percent (see units).",
    )
    units: dict[str, str] = Field(description="The unit of each number, by its path.")
    target: Target | None = Field(None, description="The target the job is judged by.")
    default_target: bool | None = Field(None, description="True: the kind's default.")
    verdict: Verdict | None = None
    code_version: str | None = None
    seeds: Seeds | None = None
    rounds: list[RoundSummary] | None = Field(
        None,
        description="Every round the job ran (more than one when escalation was allowed and "
        "the target was not met); the job's result is the last one's.",
    )
    error: JobError | None = None
    audit: ReportAudit
    timeline: list[TimelineEvent]
    request: dict[str, Any] = Field(description="The request as accepted.")
    data_deletion: DataDeletion | None = Field(
        None, description="What retention deleted when the job ended (see the job resource)."
    )
    requests: list[DeletionRequestRecord] = Field(
        default_factory=list,
        description="The deletion requests the job carries, each with its own evidence "
        "(its samples before and after); empty for a job submitted directly.",
    )
    signature: ReportSignature | None = Field(
        None, description="The service's Ed25519 signature (GET /v1/report-signing-key)."
    )


class ReportSigningKey(BaseModel):
    algorithm: Literal["Ed25519"]
    key_id: str
    public_key_pem: str = Field(description="SubjectPublicKeyInfo PEM.")
