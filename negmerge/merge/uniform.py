"""Uniform merging: the mean of the task vectors."""

from __future__ import annotations

import torch

from negmerge.merge.base import MergeMethod, State, register


@register
class Uniform(MergeMethod):
    """Every element is the mean of the n task vectors."""

    name = "uniform"
    summary = "the mean of the task vectors"
    associative = True

    def start(self, tau: torch.Tensor, index: int) -> State:
        return {"sum": tau.clone()}

    def add(self, state: State, tau: torch.Tensor, index: int) -> None:
        state["sum"].add_(tau)

    def finish(self, state: State, n: int) -> torch.Tensor:
        return state["sum"] / n

    def combine(self, first: State, second: State) -> State:
        return {"sum": first["sum"] + second["sum"]}
