"""Merging in shards: partial states of associative methods, combined later.

Machines each merge a shard of the n task vectors into a partial state (for NegMerge: the sum
and the per-element counts of positive and negative signs); combining the states in shard order
and finishing gives the same merge as one pass over all n. A partial merge may name the
variants (task vectors by index) it holds, so that combining can refuse to count one twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from negmerge.errors import MergeError
from negmerge.io import load_arrays, open_checkpoint, save_file
from negmerge.merge.base import MergeMethod, State, get_method, reduce_chunk
from negmerge.merge.streaming import common_specs, iter_memory_chunks

PARTIAL_FORMAT = "negmerge.partial_merge"


@dataclass
class PartialMerge:
    """The state of an associative merge over `n` task vectors (one shard of a larger merge)."""

    method: MergeMethod
    n: int
    states: dict[str, State]
    shapes: dict[str, tuple[int, ...]]
    variants: tuple[int, ...] = ()  # the task vectors' indices, where known

    def combine(self, later: PartialMerge) -> PartialMerge:
        """The state of this shard followed by `later`."""
        if self.method.describe() != later.method.describe():
            raise MergeError(
                f"cannot combine {self.method.describe()} with {later.method.describe()}"
            )
        if self.shapes != later.shapes:
            raise MergeError("cannot combine partial merges of different models")
        twice = set(self.variants) & set(later.variants)
        if twice:
            raise MergeError(f"both partial merges hold variant(s) {sorted(twice)}")
        with np.errstate(all="ignore"):
            states = {
                key: self.method.combine(state, later.states[key])
                for key, state in self.states.items()
            }
        variants = (*self.variants, *later.variants)
        return PartialMerge(self.method, self.n + later.n, states, self.shapes, variants)

    def finish(self, numpy: bool = False) -> dict[str, Any]:
        """The merged task vector: float32 torch tensors (numpy arrays with `numpy`)."""
        with np.errstate(all="ignore"):
            merged = {
                key: self.method.finish(state, self.n).reshape(self.shapes[key])
                for key, state in self.states.items()
            }
        if numpy:
            return merged
        import torch

        return {key: torch.from_numpy(value) for key, value in merged.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the state, packed (MergeMethod.pack), atomically."""
        tensors = {
            f"{key}::{name}": value
            for key, state in self.states.items()
            for name, value in self.method.pack(state).items()
        }
        metadata = {
            "format": PARTIAL_FORMAT,
            "method": self.method.name,
            "params": json.dumps(self.method.params.model_dump(), sort_keys=True),
            "n": str(self.n),
            "shapes": json.dumps(self.shapes),
            "variants": json.dumps(list(self.variants)),
        }
        save_file(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PartialMerge:
        with open_checkpoint(path) as ckpt:
            metadata = ckpt.metadata
        if metadata.get("format") != PARTIAL_FORMAT:
            raise MergeError(f"{path}: not a partial merge file")
        n = int(metadata["n"])
        method = get_method(metadata["method"], n, **json.loads(metadata["params"]))
        packed: dict[str, State] = {}
        for name, tensor in load_arrays(path).items():
            key, field = name.rsplit("::", 1)
            packed.setdefault(key, {})[field] = tensor
        shapes = {key: tuple(shape) for key, shape in json.loads(metadata["shapes"]).items()}
        states = {
            key: method.unpack(state, math.prod(shapes[key])) for key, state in packed.items()
        }
        variants = tuple(json.loads(metadata.get("variants", "[]")))
        return cls(method, n, states, shapes, variants)


def partial_merge(
    method: str,
    vectors: Sequence[Mapping[str, Any]],
    params: Mapping[str, object] | None = None,
    variants: Sequence[int] = (),
) -> PartialMerge:
    """The partial state of `method` over one shard of task vectors held in memory
    (`variants`: their indices, if they are to be recorded)."""
    if not vectors:
        raise MergeError("no task vectors given (n = 0)")
    instance = get_method(method, len(vectors), **dict(params or {}))
    if not instance.associative:
        raise MergeError(f"{method}: its states do not combine, so it cannot be merged in shards")
    specs = common_specs(vectors)
    states = {
        chunk.key: reduce_chunk(instance, chunk.taus(), chunk.indices, chunk.key)
        for chunk in iter_memory_chunks(vectors, specs, instance.inputs())
    }
    shapes = {k: s.shape for k, s in specs.items()}
    return PartialMerge(instance, len(vectors), states, shapes, tuple(variants))
