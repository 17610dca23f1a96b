"""Bounds on the size of a job, checked at submission: every number in a request that makes a
job's work grow is capped by an operator's setting, and a request over one is a 422 naming
the field, the value and the setting's limit, before anything is queued.

A variant's values come from the preset, the grid's base or its lists; the field named is the
one the value came from (variants.grid.epochs, variants.base.epochs or variants.preset).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from app.errors import InvalidRequest
from app.settings import Settings
from negmerge.job_spec import JobSpec
from negmerge.search import most_evaluations
from negmerge.variants import PRESETS, VariantGrid

_AUGMENT_LAYERS = re.compile(r"-n([0-9]+)")


@dataclass(frozen=True)
class JobSize:
    """What a job will do: the fine-tuning runs, their optimizer steps, the lambdas."""

    variants: int
    total_steps: int
    lambdas: int


def check_job_size(spec: JobSpec, train_samples: int, settings: Settings) -> JobSize:
    """The job's size, if every part of it is within the settings' bounds; else the 422 of
    the first part that is not. `train_samples`: the forget set's samples fine-tuned on.
    Escalation rounds count in full, as if every one of them ran."""
    rounds = [[v for _, v in spec.round_variants(r)] for r in range(spec.escalation.rounds + 1)]
    variants = [v for round_ in rounds for v in round_]
    escalated = spec.escalation.rounds > 0
    if len(rounds[0]) > settings.max_variants:
        raise _over("variants", len(rounds[0]), settings.max_variants, "max_variants", "variants")
    if len(variants) > settings.max_variants:
        raise _over(
            "escalation.rounds",
            len(variants),
            settings.max_variants,
            "max_variants",
            "variants in all rounds",
        )
    per_variant = (
        ("epochs", settings.max_epochs, "max_epochs"),
        ("steps", settings.max_steps, "max_steps"),
        ("warmup_steps", settings.max_warmup_steps, "max_warmup_steps"),
        ("batch_size", settings.max_batch_size, "max_batch_size"),
    )
    total_steps = 0
    for round_, round_variants in enumerate(rounds):
        for variant in round_variants:
            for name, limit, setting in per_variant:
                value = getattr(variant, name)
                if value is not None and value > limit:
                    if round_:  # only escalation makes it this long
                        what = f"{name} in round {round_}"
                        raise _over("escalation.rounds", value, limit, setting, what)
                    raise _over(_source(spec.variants, name), value, limit, setting)
            layers = _augment_layers(variant.augment)
            if layers > settings.max_augment_layers:
                where = _source(spec.variants, "augment")
                raise _over(
                    where, layers, settings.max_augment_layers, "max_augment_layers", "operations"
                )
            # As fine-tuning counts them: steps, or epochs x batches (the last one partial).
            total_steps += variant.steps or variant.epochs * math.ceil(
                train_samples / variant.batch_size
            )
    if total_steps > settings.max_total_steps:
        where = "escalation.rounds" if escalated else "variants"
        raise InvalidRequest(
            where,
            f"{len(variants)} variants{' in all rounds' * escalated} of {total_steps} optimizer "
            f"steps in all on {train_samples} forget samples, more than the limit of "
            f"{settings.max_total_steps} (NEGMERGE_MAX_TOTAL_STEPS); use fewer variants, "
            f"epochs or steps{' or rounds' * escalated}",
        )

    lambdas = spec.search.lambdas()
    limit = settings.max_lambda_grid_points
    if len(lambdas) > limit:
        raise _over("search.grid", len(lambdas), limit, "max_lambda_grid_points", "points")
    # A choice at the upper end extends the grid, and refinement adds points between.
    search = spec.search
    most = most_evaluations(lambdas, search.max_extensions, search.max_lambda, search.refine)
    if most > limit:
        # Refinement is to blame if the grid and it alone are over, else the extensions are.
        over_without_extensions = len(lambdas) + search.refine > limit
        raise _over(
            "search.refine" if over_without_extensions else "search.max_extensions",
            most,
            limit,
            "max_lambda_grid_points",
            "points with the grid's extensions and refinement",
        )
    if lambdas[-1] > settings.max_lambda:
        raise _over(
            "search.grid", lambdas[-1], settings.max_lambda, "max_lambda", "(its largest lambda)"
        )
    if spec.max_eval_samples is not None and spec.max_eval_samples > settings.max_eval_samples:
        raise _over(
            "max_eval_samples", spec.max_eval_samples, settings.max_eval_samples, "max_eval_samples"
        )
    if spec.search.max_lambda > settings.max_lambda:  # how far extensions may go
        raise _over("search.max_lambda", spec.search.max_lambda, settings.max_lambda, "max_lambda")
    return JobSize(len(variants), total_steps, len(lambdas) * len(rounds))


def _over(field: str, value: object, limit: object, setting: str, what: str = "") -> InvalidRequest:
    """The 422 for `value` over `limit`; `what` says what the value counts ("points")."""
    number = f"{value:g}" if isinstance(value, float) else str(value)
    given = f"{number} {what}" if what else number
    return InvalidRequest(
        field, f"{given} is more than the limit of {limit} (NEGMERGE_{setting.upper()})"
    )


def _source(grid: VariantGrid, name: str) -> str:
    """Where a variant's value of `name` was given: the grid's list, its base, or the preset."""
    if name in grid.grid:
        return f"variants.grid.{name}"
    if name in grid.base:
        return f"variants.base.{name}"
    preset = PRESETS.get(grid.preset or "", {})
    if name in preset.get("grid", {}) or name in preset.get("base", {}):
        return "variants.preset"
    return "variants"


def _augment_layers(augment: str | None) -> int:
    """The n of a RandAugment config (operations applied to each image); 0 for none."""
    if augment is None:
        return 0
    found = _AUGMENT_LAYERS.findall(augment)
    return max((int(n) for n in found), default=2)  # timm's default n is 2
