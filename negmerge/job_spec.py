"""An unlearning job as data: the schema a request, a job file and a worker share, and the
job's data splits. Nothing here imports torch, so the API validates jobs without it.

Data splits. Every manifest row has a split (train when absent). The forget set is the rows
the request names; the retain data is the retain data set's rows minus the forget set.
    forget       forget & train   fine-tuned on; reported (Acc D_f)
    forget_val   forget & val     lambda search (falls back to `forget`)
    forget_test  forget & test    reported
    retain       retain & train   reported (Acc D_r); MIA members
    retain_val   retain & val     lambda search (falls back to `retain`)
    test         retain & test    reported (Acc D_test); MIA non-members
    holdout      retain & val     holdout- and confidence-match: data the model never saw
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from negmerge.data import Manifest, Sample
from negmerge.errors import DataError, NegMergeError
from negmerge.escalation import Escalation
from negmerge.models import ModelSpec
from negmerge.search import (
    DEFAULT_REFINE,
    MAX_EXTENSIONS,
    MAX_LAMBDA,
    MAX_REFINE,
    checked_grid,
    default_grid,
)
from negmerge.variants import Variant, VariantGrid, variant_seed
from negmerge.verdict import Target, TargetKind, resolve_target, target_kind

# standard: fine-tune the model itself; linear: its tangent model (negmerge.linearize).
Finetuning = Literal["standard", "linear"]


class DataRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(description="Manifest file, folder or fsspec URI.")
    root: str | None = Field(None, description="Root of the image paths (default: beside it).")


class ForgetSpec(DataRef):
    """What to forget: samples by id, whole classes, or (neither) the whole data set."""

    ids: list[str] | None = Field(None, min_length=1)
    classes: list[str] | None = Field(None, min_length=1)


class SampleGroup(BaseModel):
    """Part of the forget set measured on its own (one deletion request's samples): by id,
    or whole classes."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] | None = Field(None, min_length=1)
    classes: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_selection(self) -> SampleGroup:
        if (self.ids is None) == (self.classes is None):
            raise ValueError("a group names ids or classes (one of them)")
        return self


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = "negmerge"
    params: dict[str, object] = Field(default_factory=dict)


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    rule: Literal["retain-threshold", "holdout-match", "confidence-match"] = Field(
        "retain-threshold",
        description="retain-threshold: the lowest forget accuracy; holdout-match: forget "
        "accuracy closest to held-out data's; confidence-match: the forget set's true-label "
        "confidence closest to held-out data's (negmerge.search).",
    )
    strategy: Literal["fast", "grid"] = "fast"
    grid: list[float] | None = Field(
        None,
        description="Lambdas to try, increasing from 0 (default 0 to 2 in steps of 0.05).",
        min_length=1,
    )
    retain_ratio: float = Field(0.95, gt=0, le=1)
    max_extensions: int = Field(
        MAX_EXTENSIONS,
        ge=0,
        le=4,
        description="Times a choice at the grid's upper end may double the grid's range.",
    )
    max_lambda: float = Field(MAX_LAMBDA, gt=0, le=100, description="Extensions stop here.")
    refine: int = Field(
        DEFAULT_REFINE,
        ge=0,
        le=MAX_REFINE,
        description="Bisections of the retain threshold's crossing above the grid's choice, "
        "where forgetting can fall off a cliff between grid points (0: none).",
    )

    @field_validator("grid")
    @classmethod
    def _searchable(cls, grid: list[float] | None) -> list[float] | None:
        # The search's own rules, checked when the job is written rather than after every
        # variant has been fine-tuned.
        return None if grid is None else checked_grid(grid)

    def lambdas(self) -> list[float]:
        """The lambdas the search may evaluate: the grid, or the default one."""
        return self.grid or default_grid()


class JobSpec(BaseModel):
    """An unlearning job: the model, what to forget, and how."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec
    forget: ForgetSpec
    retain: DataRef | None = Field(None, description="Default: the forget set's data set.")
    variants: VariantGrid
    merge: MergeSpec = Field(default_factory=MergeSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    target: Target | None = Field(
        None, description="What counts as forgotten (default: by kind, negmerge.verdict)."
    )
    escalation: Escalation = Field(
        default_factory=Escalation,
        description="Further rounds when the target is not met (negmerge.escalation).",
    )
    seed: int = Field(
        0,
        description="Each variant's seed is derived from it and the variant's index; a seed "
        "the variants give is added to it instead (in later rounds: to the derived one).",
    )
    max_eval_samples: int | None = Field(2000, gt=0, description="Cap per evaluation split.")
    eval_batch_size: int = Field(256, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    finetuning: Finetuning = Field(
        "standard",
        description="standard: fine-tune the model itself. linear: fine-tune, merge, search "
        "and measure the linearized model f(x; theta0) + J f(x; theta0)(theta - theta0) "
        "(Linear Task Arithmetic); the stored model is a linearized checkpoint, served with "
        "negmerge.models.load_linearized.",
    )

    groups: dict[str, SampleGroup] = Field(
        default_factory=dict,
        description="Parts of the forget set whose own accuracy and true-label confidence "
        "the report gives before and after (e.g. one per deletion request); each must lie "
        "within the forget set.",
    )

    @property
    def target_kind(self) -> TargetKind:
        return target_kind(self.forget.classes, self.forget.ids)

    def resolved_target(self) -> tuple[Target, bool]:
        """The target this job is judged by, and whether it is its kind's default."""
        return resolve_target(self.target, self.target_kind, self.search.retain_ratio)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> JobSpec:
        """Read a job from YAML or JSON; relative data and weight paths are taken from there."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise NegMergeError(f"{path}: cannot read the job: {exc}") from None
        try:
            spec = cls.model_validate(raw)
        except ValidationError as exc:
            raise NegMergeError(f"{path}: {describe_validation_error(exc)}") from None
        return spec.relative_to(path.parent)

    def relative_to(self, folder: Path) -> JobSpec:
        """Resolve relative local paths against `folder`."""

        def resolve(value: str | None) -> str | None:
            if value is None or "://" in value or Path(value).is_absolute():
                return value
            return str((folder / value).resolve())

        data = self.model_dump()
        for key in ("weights", "model_config_path"):
            data["model"][key] = resolve(data["model"][key])
        for part in ("forget", "retain"):
            if data[part] is not None:
                data[part]["dataset"] = resolve(data[part]["dataset"])
                data[part]["root"] = resolve(data[part]["root"])
        return JobSpec.model_validate(data)

    def variant_list(self) -> list[Variant]:
        """Round 0's variants with their training seeds resolved (see `variant_seed`)."""
        return [v for _, v in self.round_variants(0)]

    @property
    def variants_per_round(self) -> int:
        return len(self.variants.expand())

    def round_variants(self, round_: int) -> list[tuple[int, Variant]]:
        """Round `round_`'s new variants, numbered across rounds, seeds resolved."""
        first = self.variants.expand()
        n = len(first)
        found = []
        for k, v in enumerate(self.escalation.round_variants(first, round_)):
            index = round_ * n + k
            if v.seed is None:
                seed = variant_seed(self.seed, index)
            elif round_ == 0:
                seed = v.seed + self.seed
            else:  # the variant's own seed again would train the same run again
                seed = (variant_seed(self.seed, index) + v.seed) & 0x7FFFFFFF
            found.append((index, v.model_copy(update={"seed": seed})))
        return found

    def variant_at(self, index: int) -> Variant:
        """Variant `index`, numbered across rounds."""
        return dict(self.round_variants(index // self.variants_per_round))[index]

    def state_group(self, index: int) -> int:
        """The running merge states variant `index` is folded into (negmerge.merge.running):
        those of the first round whose variants are merged with it (0 for every variant
        with the `more` strategy, the variant's own round with `longer`)."""
        round_ = index // self.variants_per_round
        first = self.escalation.merged_indices(self.variants_per_round, round_)[0]
        return first // self.variants_per_round

    def merged_variants(self, round_: int) -> list[tuple[int, Variant]]:
        """The variants round `round_` merges."""
        indices = self.escalation.merged_indices(self.variants_per_round, round_)
        rounds = range(indices[0] // self.variants_per_round, round_ + 1)
        return [(i, v) for r in rounds for i, v in self.round_variants(r) if i in indices]


def describe_validation_error(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors()
    )


def group_samples(manifest: Manifest, name: str, group: SampleGroup) -> list[Sample]:
    """The samples of group `name`; DataError names the group."""
    try:
        return manifest.select(ids=group.ids, classes=group.classes)
    except DataError as exc:
        raise DataError(f"groups.{name}: {exc}") from None


def make_splits(spec: JobSpec, forget: Manifest, retain: Manifest) -> dict[str, list[Sample]]:
    """The named splits of a job (see the module's docstring)."""
    chosen = forget.select(ids=spec.forget.ids, classes=spec.forget.classes)
    if not chosen:
        raise DataError("forget: the forget set is empty")
    chosen_ids = {s.id for s in chosen}
    for name, group in spec.groups.items():
        if any(s.id not in chosen_ids for s in group_samples(forget, name, group)):
            raise DataError(f"groups.{name}: samples outside the forget set")
    forgotten = {(forget.source, s.id) for s in chosen}
    kept = [s for s in retain.samples if (retain.source, s.id) not in forgotten]

    def part(samples: list[Sample], split: str) -> list[Sample]:
        return [s for s in samples if s.split == split]

    splits = {
        "forget": part(chosen, "train"),
        "forget_val": part(chosen, "val"),
        "forget_test": part(chosen, "test"),
        "retain": part(kept, "train"),
        "retain_val": part(kept, "val"),
        "test": part(kept, "test"),
    }
    splits["holdout"] = splits["retain_val"]
    if not splits["forget"]:
        raise DataError("forget: no training-split samples to fine-tune on")
    if not kept:
        raise DataError("retain: no data left to measure what must be kept")
    splits["forget_val"] = splits["forget_val"] or splits["forget"]
    splits["retain_val"] = splits["retain_val"] or splits["retain"] or kept
    if spec.search.rule in ("holdout-match", "confidence-match") and not splits["holdout"]:
        raise DataError(f"search.rule: {spec.search.rule} needs retain samples in the val split")
    # A stated target that cannot be measured is refused before any work; the default one is
    # not (a request need not know it), and its verdict then says what was not measured.
    measurable = bool(splits["test"] and splits["retain"])
    if spec.target is not None and spec.target.needs_test_split and not measurable:
        raise DataError(
            "target: holdout_gap_max and mia_min need retain samples in the train and test "
            "splits (held-out accuracy, MIA-efficacy); this data has none"
        )
    return splits
