"""MagMax (Marczak et al., ECCV 2024): per element, the value of largest magnitude."""

from __future__ import annotations

import torch

from negmerge.merge.base import MergeMethod, State, register


@register
class MagMax(MergeMethod):
    """Every element is the task-vector value of largest magnitude; on a tie, the earlier
    task vector's (as argmax over the stacked vectors picks it)."""

    name = "magmax"
    summary = "per element, the value of largest magnitude"
    associative = True

    def start(self, tau: torch.Tensor, index: int) -> State:
        return {"value": tau.clone()}

    def add(self, state: State, tau: torch.Tensor, index: int) -> None:
        value = state["value"]
        torch.where(tau.abs() > value.abs(), tau, value, out=value)

    def finish(self, state: State, n: int) -> torch.Tensor:
        return state["value"]

    def combine(self, first: State, second: State) -> State:
        a, b = first["value"], second["value"]
        return {"value": torch.where(b.abs() > a.abs(), b, a)}
