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

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from negmerge.merge.base import Chunk, MergeMethod, State, reduce_chunk, register

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
            total = reduce_chunk(self, chunk.taus(), chunk.indices, chunk.key)["total"]
            elected += int(np.count_nonzero(total > 0)) - int(np.count_nonzero(total < 0))
        self.majority_sign = float(np.sign(elected))

    def _trim_thresholds(self, stream: Callable[[], Iterable[Chunk]]) -> list[float]:
        """Per task vector, the exact k-th smallest magnitude (radix select on fp32 bits)."""
        high = np.zeros((self.n, _HIGH_BUCKETS), dtype=np.int64)
        sizes = [0] * self.n
        for chunk in stream():
            for tau, index in zip(chunk.taus(), chunk.indices, strict=True):
                high[index] += np.bincount(_magnitude_bits(tau) >> 16, minlength=_HIGH_BUCKETS)
                sizes[index] += tau.size
        ranks = [d - int(d * (self.params.topk / 100)) for d in sizes]  # 1-based, as kthvalue
        buckets, below = [], []
        for index, rank in enumerate(ranks):
            cumulative = high[index].cumsum()
            bucket = int(np.searchsorted(cumulative, max(rank, 1)))
            buckets.append(bucket)
            below.append(int(cumulative[bucket - 1]) if bucket else 0)
        low = np.zeros((self.n, _LOW_BUCKETS), dtype=np.int64)
        for chunk in stream():
            for tau, index in zip(chunk.taus(), chunk.indices, strict=True):
                bits = _magnitude_bits(tau)
                in_bucket = bits[(bits >> 16) == buckets[index]] & 0xFFFF
                low[index] += np.bincount(in_bucket, minlength=_LOW_BUCKETS)
        thresholds = []
        for index, rank in enumerate(ranks):
            if rank == 0:  # topk = 100%: keep everything
                thresholds.append(0.0)
                continue
            cumulative = low[index].cumsum()
            low_bits = int(np.searchsorted(cumulative, rank - below[index]))
            bits = (buckets[index] << 16) | low_bits
            thresholds.append(struct.unpack("<f", struct.pack("<I", bits))[0])
        return thresholds

    def _trimmed(self, tau: np.ndarray, index: int) -> np.ndarray:
        # The threshold is an fp32 value, so comparing in fp32 is exact.
        return np.where(np.abs(tau) >= np.float32(self.thresholds[index]), tau, np.float32(0))

    def start(self, tau: np.ndarray, index: int) -> State:
        trimmed = self._trimmed(tau, index)
        positive, negative = trimmed > 0, trimmed < 0
        return {
            "total": trimmed,
            "positive_sum": np.where(positive, trimmed, np.float32(0)),
            "positive_count": positive.astype(np.int32),
            "negative_sum": np.where(negative, trimmed, np.float32(0)),
            "negative_count": negative.astype(np.int32),
        }

    def add(self, state: State, tau: np.ndarray, index: int) -> None:
        trimmed = self._trimmed(tau, index)
        positive, negative = trimmed > 0, trimmed < 0
        np.add(state["total"], trimmed, out=state["total"])
        np.add(state["positive_sum"], trimmed, out=state["positive_sum"], where=positive)
        np.add(state["positive_count"], positive, out=state["positive_count"])
        np.add(state["negative_sum"], trimmed, out=state["negative_sum"], where=negative)
        np.add(state["negative_count"], negative, out=state["negative_count"])

    def finish(self, state: State, n: int) -> np.ndarray:
        sign = np.sign(state["total"])
        sign[sign == 0] = self.majority_sign
        # torch divided fp32 by int32 counts in fp32; counts are exact in fp32 up to 2**24.
        positive_mean = state["positive_sum"] / np.maximum(state["positive_count"], 1).astype(
            np.float32
        )
        negative_mean = state["negative_sum"] / np.maximum(state["negative_count"], 1).astype(
            np.float32
        )
        return np.where(sign > 0, positive_mean, negative_mean)


def _magnitude_bits(tau: np.ndarray) -> np.ndarray:
    """|tau| as int32 bit patterns, which order the same way as the magnitudes do."""
    return np.abs(tau).view(np.int32)
