"""Uniform merging: the mean of the task vectors."""

from __future__ import annotations

import numpy as np

from negmerge.merge.base import MergeMethod, State, register


@register
class Uniform(MergeMethod):
    """Every element is the mean of the n task vectors."""

    name = "uniform"
    summary = "the mean of the task vectors"
    associative = True
    commutative = True

    def start(self, tau: np.ndarray, index: int) -> State:
        return {"sum": tau.copy()}

    def add(self, state: State, tau: np.ndarray, index: int) -> None:
        np.add(state["sum"], tau, out=state["sum"])

    def finish(self, state: State, n: int) -> np.ndarray:
        return state["sum"] / n

    def combine(self, first: State, second: State) -> State:
        return {"sum": first["sum"] + second["sum"]}
