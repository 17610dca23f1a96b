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

    # Unanimity (the default) needs no counting: all n strictly positive <=> their minimum is
    # positive, all strictly negative <=> their maximum is negative. min/max are plain float
    # ops, about three times faster than comparing and counting, and this is the hot loop.

    @property
    def _unanimous(self) -> bool:
        return self.params.consensus == 1.0

    def start(self, tau: torch.Tensor, index: int) -> State:
        if self._unanimous:
            return {"sum": tau.clone(), "min": tau.clone(), "max": tau.clone()}
        return {
            "sum": tau.clone(),
            "positive": (tau > 0).to(torch.int32),
            "negative": (tau < 0).to(torch.int32),
        }

    def add(self, state: State, tau: torch.Tensor, index: int) -> None:
        state["sum"].add_(tau)
        if self._unanimous:
            torch.minimum(state["min"], tau, out=state["min"])
            torch.maximum(state["max"], tau, out=state["max"])
        else:
            state["positive"].add_(tau > 0)
            state["negative"].add_(tau < 0)

    def finish(self, state: State, n: int) -> torch.Tensor:
        if self._unanimous:
            # Kept where min and max share a strict sign, i.e. |sign(min) + sign(max)| = 2.
            # Arithmetic on signs, because torch.where is ~6x slower than this on the CPU.
            agree = torch.sign(state["min"]).add_(torch.sign(state["max"])).abs_()
            keep = agree.sub_(1).clamp_(min=0)  # 1 where kept, 0 elsewhere
            return state["sum"].mul(keep).div_(n).add_(0.0)  # + 0.0 turns -0.0 into 0.0
        # Fraction(str(q)): 0.56 * 25 in binary floating point is more than 14.
        need = math.ceil(Fraction(str(self.params.consensus)) * n)
        keep = (state["positive"] >= need) | (state["negative"] >= need)
        return torch.where(keep, state["sum"] / n, 0.0)

    def combine(self, first: State, second: State) -> State:
        combined = {
            name: first[name] + second[name]
            for name in ("sum", "positive", "negative")
            if name in first
        }
        if self._unanimous:
            combined["min"] = torch.minimum(first["min"], second["min"])
            combined["max"] = torch.maximum(first["max"], second["max"])
        return combined
