"""MagMax (Marczak et al., ECCV 2024): per element, the value of largest magnitude."""

from __future__ import annotations

import numpy as np

from negmerge.merge.base import MergeMethod, State, register


@register
class MagMax(MergeMethod):
    """Every element is the task-vector value of largest magnitude; on a tie, the later task
    vector's, as in the official code (`merge_max_abs` replaces where |tau| >= the value kept so
    far). Ties are common in low-precision checkpoints, so the choice shows in the result."""

    name = "magmax"
    summary = "per element, the value of largest magnitude"
    associative = True

    def start(self, tau: np.ndarray, index: int) -> State:
        return {"value": tau.copy()}

    def add(self, state: State, tau: np.ndarray, index: int) -> None:
        value = state["value"]
        np.copyto(value, tau, where=np.abs(tau) >= np.abs(value))

    def finish(self, state: State, n: int) -> np.ndarray:
        return state["value"]

    def combine(self, first: State, second: State) -> State:
        a, b = first["value"], second["value"]
        return {"value": np.where(np.abs(b) >= np.abs(a), b, a)}
