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

from app.db.models import JobStage, JobState
from app.schemas.common import Strict
from negmerge.escalation import Escalation, RoundSummary
from negmerge.pipeline import MergeSpec, SearchSpec
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


class UnlearningJobCreate(Strict):
    """A deletion request: the model, what to forget, and how."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    model: ModelRef
    forget: ForgetRequest
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
        description="Keep the n fine-tuned task vectors after the merge (default: deleted "
        "once merged; their sha256 stay in the report).",
    )
    subject_reference: str | None = Field(
        None, max_length=200, description="Your reference for the data subject or ticket."
    )
    legal_basis: str | None = Field(None, max_length=200, examples=["GDPR Art. 17"])
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


class JobResult(BaseModel):
    """Written by the workers when the job succeeds."""

    model_config = ConfigDict(extra="allow")

    model_version: int | None = Field(None, description="The new version of the model.")
    lambda_: float | None = Field(None, alias="lambda")
    kept_fraction: float | None = None
    merged_bytes: int | None = Field(
        None, description="Size of the stored merged task vector (sparse unless dense is smaller)."
    )
    merged_dense_bytes: int | None = Field(
        None, description="What the merged task vector's tensors would take stored dense."
    )
    metrics_before: dict[str, float | None] | None = None
    metrics_after: dict[str, float | None] | None = None
    verdict: Verdict | None = Field(
        None, description="Whether the target was met (absent for jobs from before verdicts)."
    )


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
    links: JobLinks


class TimelineEvent(BaseModel):
    at: datetime
    kind: str = Field(examples=["state"])
    state: JobState
    stage: JobStage | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class ReportRequester(BaseModel):
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID | None
    requested_at: datetime
    subject_reference: str | None
    legal_basis: str | None


class ReportModel(BaseModel):
    model_id: uuid.UUID
    version: int
    weights_sha256: str


class UnlearningReport(BaseModel):
    """The evidence a compliance team files. `final` is true once the job has ended; until
    then the parts the workers have not produced are null."""

    job_id: uuid.UUID
    state: JobState
    final: bool
    requested_by: ReportRequester
    forgotten: JobForgetSet
    forget_selection: dict[str, Any] = Field(description="ids or classes as requested.")
    base_model: ReportModel
    unlearned_model: ReportModel | None = None
    lambda_: float | None = Field(None, alias="lambda")
    lambda_curve: list[dict[str, Any]] | None = Field(
        None, description="The lambda search's evaluations, on the validation splits."
    )
    metrics: dict[str, Any] | None = Field(
        None,
        description="before / after, on the report splits (forget, forget_test, retain, "
        "test), and MIA.",
    )
    target: Target | None = Field(None, description="The target the job is judged by.")
    default_target: bool | None = Field(None, description="True: the kind's default.")
    verdict: Verdict | None = None
    code_version: str | None = None
    seeds: dict[str, Any] | None = None
    rounds: list[RoundSummary] | None = Field(
        None,
        description="Every round the job ran (more than one when escalation was allowed and "
        "the target was not met); the job's result is the last one's.",
    )
    error: JobError | None = None
    timeline: list[TimelineEvent]
    request: dict[str, Any] = Field(description="The request as accepted.")
