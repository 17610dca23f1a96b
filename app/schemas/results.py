"""A finished job's result: the one shape the worker writes (app.services.results.job_result)
and the API, the dashboard, webhooks, retention and the evidence report read. Its parts that
the pipeline's report has too are the report's own models (negmerge.stage_outputs).

Stored in unlearning_jobs.result as this model's JSON (by alias: "lambda"); jobs stored before
a field existed read it as its default. A change of shape migrates the stored rows (0011 did
for model_version and metrics_before/after, now model.version and metrics.before/after).
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from negmerge.escalation import RoundSummary
from negmerge.stage_outputs import BeforeAfter, GroupBeforeAfter, LambdaEvaluated, Seeds
from negmerge.verdict import Verdict


class StoredVersion(BaseModel):
    """The model version the job stored (none at lambda 0: the model is unchanged)."""

    model_id: uuid.UUID
    version: int = Field(description="The new version of the model.", examples=[2])
    version_id: uuid.UUID
    weights_sha256: str


class JobResult(BaseModel):
    """Written by the workers when the job succeeds."""

    model_config = ConfigDict(populate_by_name=True)

    model: StoredVersion | None = Field(
        None, description="The version it stored; absent at lambda 0 (the model is unchanged)."
    )
    verdict: Verdict | None = Field(
        None, description="Whether the target was met (absent for jobs from before verdicts)."
    )
    lambda_: float | None = Field(None, alias="lambda", description="The chosen lambda.")
    lambda_curve: list[LambdaEvaluated] = Field(
        default_factory=list, description="Every lambda the search evaluated, in lambda order."
    )
    kept_fraction: float | None = Field(None, description="Share of elements the merge kept.")
    metrics: BeforeAfter | None = None
    groups: dict[str, GroupBeforeAfter] = Field(
        default_factory=dict,
        description="A batch's deletion requests, by id: each one's own samples' count, "
        "accuracy and mean true-label confidence (percent), before and after.",
    )
    split_sizes: dict[str, int] = Field(default_factory=dict, description="Samples per split.")
    code_version: str | None = None
    seeds: Seeds | None = None
    base_model_sha256: str | None = Field(
        None, description="The base version's weights, as stored and downloaded."
    )
    base_copy_sha256: str | None = Field(
        None, description="The worker's re-serialised working copy of the base weights."
    )
    merged_sha256: str | None = None
    merged_bytes: int | None = Field(
        None, description="Size of the stored merged task vector (sparse unless dense is smaller)."
    )
    merged_dense_bytes: int | None = Field(
        None, description="What the merged task vector's tensors would take stored dense."
    )
    task_vector_sha256: list[str] = Field(default_factory=list)
    finetuning: str = "standard"
    round: int = Field(0, description="The round whose model this is (0: no escalation).")
    rounds: list[RoundSummary] = Field(default_factory=list)
    timings: dict[str, float | None] = Field(default_factory=dict, description="Seconds.")

    @classmethod
    def of(cls, stored: dict[str, Any] | None) -> JobResult | None:
        """The result a job row stores (None before the job has one)."""
        return cls.model_validate(stored) if stored else None

    def to_json(self) -> dict[str, Any]:
        """What unlearning_jobs.result stores."""
        return self.model_dump(mode="json", by_alias=True)

    @property
    def met(self) -> bool:
        """Whether the job forgot as its target asks (False without a verdict)."""
        return self.verdict is not None and self.verdict.met
