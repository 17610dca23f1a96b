"""Forgetting targets and the verdict: did the unlearned model forget what was asked?

A job's target is a few bounds on the metrics the pipeline already measures (see
`negmerge.context.JobContext.metrics`), all in percent:

    forget_acc_max   every forget split's accuracy is at most this
    forget_drop_min  every forget split's accuracy fell by at least this share of its original
    holdout_gap_max  every forget split's accuracy is within this many points of held-out
                     (test) accuracy: what a model that never saw the forget set would show
    mia_min          MIA-efficacy is at least this
    retain_ratio     every retain split (retain, test) kept at least this share of its
                     original accuracy (default: the lambda rule's retain_ratio)

The forget splits are `forget` (the forget set's training rows, the ones fine-tuned on) and
`forget_test` when it has samples; the retain splits are `retain` and `test`. Each kind of
request has a default target (DEFAULT_TARGETS), chosen by what it forgets: whole classes,
samples by id, or (neither) a whole data set, i.e. a domain.

A lambda of 0 leaves the model unchanged, so its verdict is never met, whatever the bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TargetKind = Literal["class", "domain", "samples"]

FORGET_SPLITS = {"forget_acc": "forget", "forget_test_acc": "forget test"}
RETAIN_SPLITS = {"retain_acc": "retain", "test_acc": "test"}


class Target(BaseModel):
    """What "forgotten" means for one job: bounds on the unlearned model's metrics."""

    model_config = ConfigDict(extra="forbid")

    forget_acc_max: float | None = Field(
        None, ge=0, le=100, description="Forget accuracy at most this (percent), every split."
    )
    forget_drop_min: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Forget accuracy fell by at least this share of the original's "
        "(0.5: to half or less), every split.",
    )
    holdout_gap_max: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Forget accuracy within this many points of held-out (test) accuracy.",
    )
    mia_min: float | None = Field(None, ge=0, le=100, description="MIA-efficacy at least this.")
    retain_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Retain and test accuracy at least this share of the original's "
        "(default: the lambda search's retain_ratio).",
    )

    @model_validator(mode="after")
    def _bounds_something_forgotten(self) -> Target:
        if all(
            getattr(self, name) is None
            for name in ("forget_acc_max", "forget_drop_min", "holdout_gap_max", "mia_min")
        ):
            raise ValueError(
                "state at least one of forget_acc_max, forget_drop_min, holdout_gap_max, mia_min"
            )
        return self

    @property
    def needs_test_split(self) -> bool:
        """Held-out accuracy and MIA are measured on the retain data's test split."""
        return self.holdout_gap_max is not None or self.mia_min is not None


# The defaults, by kind. Class: the class is recognised no better than one time in ten
# (a model retrained without it never predicts it). Domain: forget accuracy at most half the
# original's (the paper's CLIP results halve it). Samples: forget accuracy near held-out
# accuracy, as a model retrained without the samples shows (Retrain sits ~6 points above
# held-out on our sample-deletion benchmark), and an attacker calls at least a tenth of the
# forget set non-members.
DEFAULT_TARGETS: dict[TargetKind, Target] = {
    "class": Target(forget_acc_max=10.0),
    "domain": Target(forget_drop_min=0.5),
    "samples": Target(holdout_gap_max=8.0, mia_min=10.0),
}


def target_kind(classes: list[str] | None, ids: list[str] | None) -> TargetKind:
    """The kind of a request from its forget selection."""
    if classes:
        return "class"
    if ids:
        return "samples"
    return "domain"


def resolve_target(
    target: Target | None, kind: TargetKind, retain_ratio: float
) -> tuple[Target, bool]:
    """The target a job is judged by, with retain_ratio filled in, and whether it is the
    kind's default."""
    chosen = target if target is not None else DEFAULT_TARGETS[kind]
    if chosen.retain_ratio is None:
        chosen = chosen.model_copy(update={"retain_ratio": retain_ratio})
    return chosen, target is None


class Check(BaseModel):
    """One bound applied to one measured number."""

    bound: str = Field(description="The target's field, or 'lambda'.", examples=["forget_acc_max"])
    metric: str = Field(description="The metric it applies to.", examples=["forget_acc"])
    label: str = Field(description="The metric, for people.", examples=["forget accuracy"])
    value: float | None = Field(description="The unlearned model's value (None: not measured).")
    limit: float = Field(description="The value must be on the right side of this.")
    comparison: Literal["<=", ">=", ">"]
    met: bool
    text: str = Field(examples=["forget accuracy 92.19 (must be <= 10)"])


class Verdict(BaseModel):
    """Whether a job met its target, with every check and the numbers."""

    model_config = ConfigDict(populate_by_name=True)

    met: bool
    kind: TargetKind
    target: Target = Field(description="The target the job was judged by.")
    default_target: bool = Field(description="True: the kind's default (none was stated).")
    lambda_: float = Field(alias="lambda")
    checks: list[Check]
    reason: str = Field(description="One line for people: what was met, or what was not.")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def judge(
    target: Target,
    kind: TargetKind,
    before: Mapping[str, float | None],
    after: Mapping[str, float | None],
    lam: float,
    *,
    default_target: bool = False,
) -> Verdict:
    """Judge the unlearned model's metrics `after` (the original's: `before`) against
    `target` (resolved: retain_ratio set)."""
    if target.retain_ratio is None:
        raise ValueError("judge needs a resolved target (retain_ratio set): see resolve_target")
    checks: list[Check] = []

    def check(bound: str, metric: str, value: float | None, op: str, limit: float) -> None:
        met = value is not None and (
            value <= limit if op == "<=" else value >= limit if op == ">=" else value > limit
        )
        label = _LABELS.get(metric, metric)
        shown = "not measured" if value is None else f"{value:.2f}"
        text = f"{label} {shown} (must be {op} {limit:.4g})"
        checks.append(Check(bound=bound, metric=metric, label=label, value=value, limit=limit,
                            comparison=op, met=met, text=text))  # fmt: skip

    check("lambda", "lambda", float(lam), ">", 0.0)
    # forget_acc is always measured (the forget set is never empty); forget_test_acc only when
    # the forget set has test rows.
    measured = [m for m in FORGET_SPLITS if m == "forget_acc" or after.get(m) is not None]
    for metric in measured:
        value = after.get(metric)
        if target.forget_acc_max is not None:
            check("forget_acc_max", metric, value, "<=", target.forget_acc_max)
        original = before.get(metric)
        if target.forget_drop_min is not None and original is not None:
            limit = (1 - target.forget_drop_min) * original
            check("forget_drop_min", metric, value, "<=", limit)
        if target.holdout_gap_max is not None:
            held_out = after.get("test_acc")
            gap = None if value is None or held_out is None else abs(value - held_out)
            check("holdout_gap_max", f"{metric}_gap_to_test", gap, "<=", target.holdout_gap_max)
    if target.mia_min is not None:
        check("mia_min", "mia", after.get("mia"), ">=", target.mia_min)
    for metric in RETAIN_SPLITS:
        original = before.get(metric)
        if original is not None:
            check("retain_ratio", metric, after.get(metric), ">=", target.retain_ratio * original)

    met = all(c.met for c in checks)
    return Verdict(
        met=met,
        kind=kind,
        target=target,
        default_target=default_target,
        lambda_=float(lam),
        checks=checks,
        reason=_reason(met, checks, target),
    )


_LABELS = {
    "lambda": "lambda",
    "forget_acc": "forget accuracy",
    "forget_test_acc": "forget test accuracy",
    "forget_acc_gap_to_test": "|forget - test accuracy|",
    "forget_test_acc_gap_to_test": "|forget test - test accuracy|",
    "mia": "MIA-efficacy",
    "retain_acc": "retain accuracy",
    "test_acc": "test accuracy",
}


def _reason(met: bool, checks: list[Check], target: Target) -> str:
    if met:
        return "target met: " + "; ".join(c.text for c in checks if c.bound != "lambda")
    if not checks[0].met:  # lambda 0
        return (
            f"not met: the lambda search chose 0 (no lambda > 0 lowered forget accuracy while "
            f"keeping retain accuracy at or above {target.retain_ratio:g} x the original's on "
            "the validation split), so the model is unchanged and nothing was forgotten"
        )
    return "not met: " + "; ".join(c.text for c in checks if not c.met)
