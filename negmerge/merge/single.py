"""Task Arithmetic with one task vector: the baseline NegMerge is compared against."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from negmerge.errors import MergeError
from negmerge.merge.base import MergeMethod, State, register


class SingleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(0, ge=0, description="Which task vector to use (0-based).")


@register
class Single(MergeMethod):
    """One task vector, unchanged. The best of n is chosen by running the lambda search once
    per index."""

    name = "single"
    summary = "one task vector unchanged (Task Arithmetic)"
    Params = SingleParams

    def __init__(self, n: int, **params: object) -> None:
        super().__init__(n, **params)
        if self.params.index >= n:
            raise MergeError(f"single: index {self.params.index} is out of range for n = {n}")

    def inputs(self) -> list[int]:
        return [self.params.index]

    def start(self, tau: np.ndarray, index: int) -> State:
        return {"value": tau.copy()}

    def add(self, state: State, tau: np.ndarray, index: int) -> None:
        raise MergeError("single: reads exactly one task vector")

    def finish(self, state: State, n: int) -> np.ndarray:
        return state["value"]
