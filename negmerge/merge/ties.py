"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

Exactly the reference rule, over all of a task vector's elements as one flat vector:
1. trim: keep the elements with |tau_k| >= the k-th smallest |tau_k|, k = d - int(d * topk/100);
2. elect: each element's sign is the sign of the sum of the trimmed values; where that sum is
   0, the sign that wins over the whole model (the sign of the sum of the elected signs);
3. disjoint mean: the mean of the trimmed values that agree with the elected sign.
Steps 1 and 2 need whole-model statistics, gathered in streaming passes before the merge: two
passes of a radix select find each task vector's exact trim threshold, one more finds the
winning sign.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field

from negmerge.merge.base import Chunk, MergeMethod, State, register

_HIGH_BUCKETS = 1 << 15  # |x| has sign bit 0, so the high half of its bits is below 2**15
_LOW_BUCKETS = 1 << 16


class TiesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topk: float = Field(
        20.0, gt=0, le=100, description="Percent of each task vector's elements kept by magnitude."
    )


@register
class Ties(MergeMethod):
    """Trim each task vector to its top-k% magnitudes, elect signs, average agreeing values."""

    name = "ties"
    summary = "TIES-Merging: trim to top-k%, elect sign, disjoint mean"
    Params = TiesParams

    def prepare(self, stream: Callable[[], Iterable[Chunk]]) -> None:
        self.thresholds = self._trim_thresholds(stream)
        elected = 0
        for chunk in stream():
            state = self.start(chunk.taus[0], chunk.indices[0])
            for tau, index in zip(chunk.taus[1:], chunk.indices[1:], strict=True):
                self.add(state, tau, index)
            elected += int(torch.sign(state["total"]).sum())
        self.majority_sign = float(torch.sign(torch.tensor(float(elected))))

    def _trim_thresholds(self, stream: Callable[[], Iterable[Chunk]]) -> list[float]:
        """Per task vector, the exact k-th smallest magnitude (radix select on fp32 bits)."""
        high = torch.zeros(self.n, _HIGH_BUCKETS, dtype=torch.int64)
        sizes = [0] * self.n
        for chunk in stream():
            for tau, index in zip(chunk.taus, chunk.indices, strict=True):
                high[index] += torch.bincount(_magnitude_bits(tau) >> 16, minlength=_HIGH_BUCKETS)
                sizes[index] += tau.numel()
        ranks = [d - int(d * (self.params.topk / 100)) for d in sizes]  # 1-based, as kthvalue
        buckets, below = [], []
        for index, rank in enumerate(ranks):
            cumulative = high[index].cumsum(0)
            bucket = int(torch.searchsorted(cumulative, max(rank, 1)))
            buckets.append(bucket)
            below.append(int(cumulative[bucket - 1]) if bucket else 0)
        low = torch.zeros(self.n, _LOW_BUCKETS, dtype=torch.int64)
        for chunk in stream():
            for tau, index in zip(chunk.taus, chunk.indices, strict=True):
                bits = _magnitude_bits(tau)
                in_bucket = bits[(bits >> 16) == buckets[index]] & 0xFFFF
                low[index] += torch.bincount(in_bucket, minlength=_LOW_BUCKETS)
        thresholds = []
        for index, rank in enumerate(ranks):
            if rank == 0:  # topk = 100%: keep everything
                thresholds.append(0.0)
                continue
            cumulative = low[index].cumsum(0)
            low_bits = int(torch.searchsorted(cumulative, rank - below[index]))
            bits = (buckets[index] << 16) | low_bits
            thresholds.append(struct.unpack("<f", struct.pack("<I", bits))[0])
        return thresholds

    def _trimmed(self, tau: torch.Tensor, index: int) -> torch.Tensor:
        return torch.where(tau.abs() >= self.thresholds[index], tau, 0.0)

    def start(self, tau: torch.Tensor, index: int) -> State:
        trimmed = self._trimmed(tau, index)
        positive, negative = trimmed > 0, trimmed < 0
        return {
            "total": trimmed,
            "positive_sum": torch.where(positive, trimmed, 0.0),
            "positive_count": positive.to(torch.int32),
            "negative_sum": torch.where(negative, trimmed, 0.0),
            "negative_count": negative.to(torch.int32),
        }

    def add(self, state: State, tau: torch.Tensor, index: int) -> None:
        trimmed = self._trimmed(tau, index)
        positive, negative = trimmed > 0, trimmed < 0
        state["total"].add_(trimmed)
        state["positive_sum"].add_(torch.where(positive, trimmed, 0.0))
        state["positive_count"].add_(positive)
        state["negative_sum"].add_(torch.where(negative, trimmed, 0.0))
        state["negative_count"].add_(negative)

    def finish(self, state: State, n: int) -> torch.Tensor:
        sign = torch.sign(state["total"])
        sign[sign == 0] = self.majority_sign
        positive_mean = state["positive_sum"] / state["positive_count"].clamp(min=1)
        negative_mean = state["negative_sum"] / state["negative_count"].clamp(min=1)
        return torch.where(sign > 0, positive_mean, negative_mean)


def _magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|tau| as int32 bit patterns, which order the same way as the magnitudes do."""
    return tau.abs().view(torch.int32)
