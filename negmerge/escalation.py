"""Escalation: further rounds of fine-tuning when a job's target is not met.

A request may allow a few more rounds within a budget it declares. Round 0 is the job's own
variants; each later round trains as many new variants (new seeds, so new data orders and
augmentations) and is merged, searched and judged like round 0. Two ways to escalate:

    more    the new variants have the same hyperparameters; the round merges every variant
            trained so far (n, 2n, 3n ...). More runs agreeing on a sign is stricter evidence
            that an element carries the forget set rather than one run's noise.
    longer  the new variants train twice as long as the last round's (epochs or steps x 2);
            the round merges only its own. For task vectors too weak to move the forget set
            within the retain constraint.

The job stops at the first round that meets its target, or when the next round would exceed
the budget; its result is that round's (the last one when none met), and every round is in
the report. Variants are numbered across rounds: round r's are r*n .. (r+1)*n - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from negmerge.variants import Variant

MAX_ROUNDS = 3


class RoundVerdict(BaseModel):
    met: bool
    reason: str


class RoundSummary(BaseModel):
    """One round of a job, as the report and the job's result list it."""

    model_config = ConfigDict(populate_by_name=True)

    round: int = Field(description="0: the job's own variants; 1 and on: escalation rounds.")
    variants_merged: list[int] = Field(description="The variants this round merged.")
    finetune_seconds: float = Field(description="Fine-tuning time of this round's new variants.")
    kept_fraction: float = Field(description="Share of elements the merge kept.")
    lambda_: float = Field(alias="lambda")
    verdict: RoundVerdict
    model_sha256: str | None = Field(description="This round's model (None at lambda 0).")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


class Escalation(BaseModel):
    """How far a job may go past its first round when its target is not met."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rounds: int = Field(
        0, ge=0, le=MAX_ROUNDS, description="Further rounds allowed (0: the job has one round)."
    )
    strategy: Literal["more", "longer"] = Field(
        "more",
        description="more: n more variants a round, all merged together; longer: n new "
        "variants a round, each trained twice as long as the last round's.",
    )
    max_variants: int | None = Field(
        None, gt=0, description="Variants trained in all rounds at most (default: no limit)."
    )
    max_finetune_seconds: float | None = Field(
        None,
        gt=0,
        description="Fine-tuning time in all rounds at most, judged before a round starts from "
        "the rounds so far (default: no limit).",
    )

    def round_variants(self, first: Sequence[Variant], round_: int) -> list[Variant]:
        """Round `round_`'s new variants (seeds unresolved), given round 0's."""
        if round_ == 0 or self.strategy == "more":
            return list(first)
        factor = 2**round_
        return [
            v.model_copy(
                update={"steps": v.steps * factor} if v.steps else {"epochs": v.epochs * factor}
            )
            for v in first
        ]

    def merged_indices(self, n: int, round_: int) -> range:
        """The variants round `round_` merges (n: variants a round)."""
        return range(0 if self.strategy == "more" else round_ * n, (round_ + 1) * n)

    def next_round(self, round_: int, n: int, round_seconds: Sequence[float]) -> str | None:
        """Why no round follows round `round_` (None: one may). `round_seconds`: each round's
        fine-tuning time so far; the next round is estimated to cost what the last one did,
        twice that with `longer`."""
        if round_ >= self.rounds:
            return f"the request allows {self.rounds} further round(s)"
        if self.max_variants is not None and (round_ + 2) * n > self.max_variants:
            return f"round {round_ + 1} would train more than max_variants={self.max_variants}"
        if self.max_finetune_seconds is not None and round_seconds:
            growth = 2 if self.strategy == "longer" else 1
            estimate = sum(round_seconds) + growth * round_seconds[-1]
            if estimate > self.max_finetune_seconds:
                return (
                    f"round {round_ + 1} would bring fine-tuning to about {estimate:.0f} s, "
                    f"more than max_finetune_seconds={self.max_finetune_seconds:g}"
                )
        return None
