"""NegMerge (ICML 2025): keep only the elements where the task vectors agree in sign."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from pydantic import BaseModel, ConfigDict, Field

from negmerge.merge.base import MergeMethod, State, register


class NegMergeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    consensus: float = Field(
        1.0,
        gt=0.5,
        le=1.0,
        description="Share q of the n signs that must agree (at least ceil(q*n) strictly "
        "positive, or as many strictly negative). 1 is the paper's strict unanimity.",
    )


@register
class NegMerge(MergeMethod):
    """An element is kept when at least ceil(q*n) task vectors are strictly positive there, or
    as many strictly negative (q = 1: all of them; a single exact zero drops it). A kept
    element is the sum over all n divided by n; every other element is 0."""

    name = "negmerge"
    summary = "sign-consensus merge (the paper's rule; --consensus q relaxes unanimity)"
    Params = NegMergeParams
    associative = True

    def start(self, tau: torch.Tensor, index: int) -> State:
        return {
            "sum": tau.clone(),
            "positive": (tau > 0).to(torch.int32),
            "negative": (tau < 0).to(torch.int32),
        }

    def add(self, state: State, tau: torch.Tensor, index: int) -> None:
        state["sum"].add_(tau)
        state["positive"].add_(tau > 0)
        state["negative"].add_(tau < 0)

    def finish(self, state: State, n: int) -> torch.Tensor:
        # Fraction(str(q)): 0.9 * 10 in binary floating point rounds up to more than 9.
        need = math.ceil(Fraction(str(self.params.consensus)) * n)
        keep = (state["positive"] >= need) | (state["negative"] >= need)
        return torch.where(keep, state["sum"] / n, 0.0)

    def combine(self, first: State, second: State) -> State:
        return {name: first[name] + second[name] for name in first}
