"""What each stage of negmerge.pipeline returns: one model per stage output, torch-free (the
API reads the report, and the workers pass the outputs between steps through the database).

    prepare -> Original          finetune_variant -> VariantRecord   fold_variant -> MergeState
    merge_variants -> Merged     search -> Searched                  finalize -> Report

A stage's JSON file in the work directory (negmerge.workdir: original.json, search.json,
report.json; a variant's <variant>.json sidecar is VariantStats) is its model's JSON by alias
("lambda"), and a resumed stage reads it back with model_validate, so the files keep the keys
they had: a key that used to be absent rather than null (`absent_when_none`) is still left
out. Fields that files from before them lack have defaults. The worker's conversions at its
database boundary are `to_stored` and Model.model_validate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from negmerge.escalation import RoundSummary
from negmerge.verdict import Verdict
from negmerge.workdir import write_json_atomic

Metrics = dict[str, float | None]


class StageOutput(BaseModel):
    """A stage output's JSON: by alias, without the `absent_when_none` keys that are None."""

    model_config = ConfigDict(populate_by_name=True)

    absent_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in self.absent_when_none:
            if name in data and data[name] is None:
                del data[name]
        return data

    def write(self, path: Path) -> None:
        """Write this output to its file in the work directory (atomically)."""
        write_json_atomic(path, to_stored(self))

    @classmethod
    def read(cls: type[Output], path: Path) -> Output:
        """The output a stage wrote to `path`."""
        return cls.model_validate_json(path.read_text())


Output = TypeVar("Output", bound=StageOutput)


def to_stored(output: StageOutput) -> dict[str, Any]:
    """`output` as JSON data: what its file and the worker's step record hold."""
    return output.model_dump(mode="json", by_alias=True)


# ---- prepare --------------------------------------------------------------------------------


class Original(StageOutput):
    """The original model, measured: the "before" of the report."""

    metrics: Metrics
    base_sha256: str = Field(description="The worker's re-serialised copy of the base model.")
    weights_sha256: str | None = Field(description="The base weights file (None: built in).")
    forget_manifest_sha256: str
    forget_count: int
    split_sizes: dict[str, int]
    seconds: float


# ---- finetune_variant and fold_variant ------------------------------------------------------


class MergeState(StageOutput):
    """A running merge state (negmerge.merge.running) holding `variants`; the worker that
    folds it adds itself and the state it replaces (worker.merge_states)."""

    group: int
    path: str
    sha256: str
    bytes: int
    variants: list[int]
    worker: str | None = None
    replaces: str | None = None


class VariantStats(StageOutput):
    """What a variant's fine-tuning measured: its task vector's <variant>.json sidecar (kept
    out of the file itself, so that a seed gives the same bytes)."""

    seconds: float | None = None
    final_loss: float | None = None
    device_usage: dict[str, float] | None = Field(None, description="None on CPU.")


class VariantRecord(VariantStats):
    """A fine-tuned variant: its task vector file (`path`; absent once it is folded into a
    running merge state and deleted) and its hash."""

    absent_when_none: ClassVar[tuple[str, ...]] = ("path", "merge_state")

    index: int
    key: str
    hyperparameters: dict[str, Any]
    tau_sha256: str
    path: str | None = None
    merge_state: MergeState | None = None


# ---- merge_variants -------------------------------------------------------------------------


class MergeSummary(StageOutput):
    """The merged task vector of a round: the report's "merge"."""

    absent_when_none: ClassVar[tuple[str, ...]] = ("seconds",)

    round: int = 0
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    n: int
    kept_fraction: float
    merged_sha256: str
    merged_layout: str | None = None
    merged_bytes: int | None = None
    merged_dense_bytes: int | None = None
    seconds: float | None = Field(None, description="The worker's merge step (absent in-process).")


class Merged(MergeSummary):
    """merge_variants' output: the merged vector and the variants it merged, by index."""

    variants: list[VariantRecord]

    def summary(self) -> MergeSummary:
        return MergeSummary.model_validate(self.model_dump(exclude={"variants"}))


# ---- search ---------------------------------------------------------------------------------


class Evaluated(StageOutput):
    """Accuracies of one candidate model (negmerge.search.Evaluation.to_dict): the
    confidences only where measured (confidence-match)."""

    absent_when_none: ClassVar[tuple[str, ...]] = ("forget_conf", "holdout_conf")

    forget_acc: float
    retain_acc: float
    holdout_acc: float | None = None
    forget_conf: float | None = None
    holdout_conf: float | None = None


class LambdaEvaluated(Evaluated):
    """One lambda the search evaluated."""

    lambda_: float = Field(alias="lambda")


class Searched(StageOutput):
    """The lambda search of a round (negmerge.search.SearchResult.to_dict) and its time."""

    lambda_: float = Field(alias="lambda")
    evaluation: Evaluated
    reference: Evaluated
    rule: str
    retain_ratio: float
    retain_threshold: float
    strategy: str
    at_upper_end: bool
    grid_size: int = 0
    extensions: int = 0
    n_evaluated: int
    evaluation_order: list[float]
    evaluations: list[LambdaEvaluated] = Field(default_factory=list, description="By lambda.")
    refined: list[float] = Field(default_factory=list)
    round: int = 0
    seconds: float


# ---- finalize -------------------------------------------------------------------------------


class Seeds(BaseModel):
    job: int
    variants: list[int]


class BaseModelHashes(BaseModel):
    sha256: str = Field(description="The worker's re-serialised copy of the base model.")
    weights_sha256: str | None = Field(None, description="The base weights, as given.")


class ForgetSetHashes(BaseModel):
    manifest_sha256: str
    count: int


class BeforeAfter(BaseModel):
    before: Metrics = Field(description="The original model's metrics (percent; mia a share).")
    after: Metrics = Field(description="The unlearned model's, at the chosen lambda.")


class GroupMetrics(BaseModel):
    count: int = Field(description="The group's samples measured.")
    acc: float | None = Field(None, description="Accuracy on them (percent).")
    true_label_confidence: float | None = Field(
        None, description="Mean probability of their true label (percent)."
    )


class GroupBeforeAfter(BaseModel):
    before: GroupMetrics
    after: GroupMetrics


class EscalationOutcome(BaseModel):
    next_round: int | None = Field(description="The round that follows (None: none does).")
    stopped_because: str | None = Field(description="Why none follows, e.g. 'target met'.")


class ModelFile(BaseModel):
    path: str
    sha256: str


class Report(StageOutput):
    """The evidence report of a round (report.json): what went in, what was chosen, what came
    out, and whether another round follows."""

    format: str = "negmerge.report/1"
    code_version: str
    # The job as it ran (JSON of its JobSpec), untyped here: an older report's job need not
    # pass today's JobSpec rules to be read.
    job: dict[str, Any]
    seeds: Seeds
    base_model: BaseModelHashes
    forget_set: ForgetSetHashes
    split_sizes: dict[str, int]
    variants: list[VariantRecord]
    merge: MergeSummary
    search: Searched
    lambda_: float = Field(alias="lambda")
    metrics: BeforeAfter
    groups: dict[str, GroupBeforeAfter] = Field(default_factory=dict)
    verdict: Verdict
    round: int = 0
    rounds: list[RoundSummary] = Field(default_factory=list)
    escalation: EscalationOutcome
    model: ModelFile | None = Field(description="None at lambda 0: the model is unchanged.")
    finetuning: str = "standard"
    timings: dict[str, float | None]
