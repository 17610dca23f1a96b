"""NegMerge (ICML 2025): keep only the elements where the task vectors agree in sign."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
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
    commutative = True

    # Unanimity (the default) needs no counting: all n strictly positive <=> their minimum is
    # positive, all strictly negative <=> their maximum is negative. min/max are plain float
    # ops, cheaper than comparing and counting, and this is the hot loop.

    @property
    def _unanimous(self) -> bool:
        return self.params.consensus == 1.0

    def start(self, tau: np.ndarray, index: int) -> State:
        if self._unanimous:
            return {"sum": tau.copy(), "min": tau.copy(), "max": tau.copy()}
        return {
            "sum": tau.copy(),
            "positive": (tau > 0).astype(np.int32),
            "negative": (tau < 0).astype(np.int32),
        }

    def add(self, state: State, tau: np.ndarray, index: int) -> None:
        np.add(state["sum"], tau, out=state["sum"])
        if self._unanimous:
            np.minimum(state["min"], tau, out=state["min"])
            np.maximum(state["max"], tau, out=state["max"])
        else:
            np.add(state["positive"], tau > 0, out=state["positive"])
            np.add(state["negative"], tau < 0, out=state["negative"])

    def finish(self, state: State, n: int) -> np.ndarray:
        if self._unanimous:
            # min <= max, so min > 0 or max < 0 is "all of one strict sign". A NaN anywhere
            # makes the sum NaN, and NaN * 0 stays NaN, as it always has.
            keep = np.greater(state["min"], 0)
            keep |= state["max"] < 0
            merged = np.multiply(state["sum"], keep)
            merged /= n
            merged += 0.0  # turns -0.0 into 0.0
            return merged
        # Fraction(str(q)): 0.56 * 25 in binary floating point is more than 14.
        need = math.ceil(Fraction(str(self.params.consensus)) * n)
        keep = (state["positive"] >= need) | (state["negative"] >= need)
        return np.where(keep, state["sum"] / n, np.float32(0))

    def combine(self, first: State, second: State) -> State:
        combined = {
            name: first[name] + second[name]
            for name in ("sum", "positive", "negative")
            if name in first
        }
        if self._unanimous:
            combined["min"] = np.minimum(first["min"], second["min"])
            combined["max"] = np.maximum(first["max"], second["max"])
        return combined

    # Stored, a unanimous state is the fp32 sum and two bits an element, all positive so far
    # and all negative so far (1.06x the model); min and max come back as +-1, which finish
    # and combine read the same way. Counts fit 16 bits (n is far below 32768).

    def pack(self, state: State) -> State:
        if self._unanimous:
            return {
                "sum": state["sum"],
                "all_positive": np.packbits(state["min"] > 0),
                "all_negative": np.packbits(state["max"] < 0),
            }
        return {
            "sum": state["sum"],
            "positive": state["positive"].astype(np.int16),
            "negative": state["negative"].astype(np.int16),
        }

    def unpack(self, packed: State, size: int) -> State:
        if self._unanimous:
            positive = np.unpackbits(packed["all_positive"], count=size).astype(bool)
            negative = np.unpackbits(packed["all_negative"], count=size).astype(bool)
            one = np.float32(1)
            return {
                "sum": packed["sum"],
                "min": np.where(positive, one, -one),
                "max": np.where(negative, -one, one),
            }
        return {
            "sum": packed["sum"],
            "positive": packed["positive"].astype(np.int32),
            "negative": packed["negative"].astype(np.int32),
        }
