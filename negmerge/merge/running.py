"""A running merge state: fold each task vector in as it is made, keep none of them.

A merge needs no stored task vectors when its method is commutative (base.MergeMethod): each
worker folds each variant it finishes into a partial state of its own (for NegMerge the fp32
sum and two sign bits an element: about 1.06x the model), and the merge combines the workers'
states. Storage is then one state per worker, not n task vectors.

A fold never changes its input state: it writes a new state file beside it (atomically) that
names the variants it holds, and the caller records which file is current; a fold that dies
half-way leaves the current state as it was. A state that already holds the variant is
refused, so a variant is never counted twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from negmerge.errors import MergeError
from negmerge.io import SafetensorsWriter, TensorSpec, float_keys, open_checkpoint, to_float32
from negmerge.merge.base import METHODS, MergeMethod
from negmerge.merge.partial import PartialMerge, partial_merge
from negmerge.merge.streaming import (
    OUTPUT_FORMAT,
    MergeResult,
    kept_count,
    replace_with_dense,
)
from negmerge.sparse import SparseWriter


def supports_running(method: str) -> bool:
    """Whether `method` can keep a running state (its fold does not depend on order)."""
    cls = METHODS.get(method)
    return cls is not None and cls.commutative


def read_task_vector(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A task-vector file's floating-point tensors as flat float32 arrays."""
    with open_checkpoint(path) as ckpt:
        return {
            key: to_float32(
                ckpt.read_array(key).reshape(-1),
                ckpt.specs[key].dtype,
                np.empty(ckpt.specs[key].numel, np.float32),
            ).reshape(ckpt.specs[key].shape)
            for key in float_keys(ckpt.specs)
        }


def fold_task_vector(
    method: str,
    params: Mapping[str, object] | None,
    task_vector: str | os.PathLike,
    index: int,
    state: str | os.PathLike | None,
    output: str | os.PathLike,
) -> PartialMerge:
    """Write to `output` the state `state` (None: an empty one) with task vector `index`
    (the file `task_vector`) folded in. `state` itself is left as it was."""
    folded = partial_merge(method, [read_task_vector(task_vector)], params, variants=[index])
    if state is not None:
        earlier = PartialMerge.load(state)
        if index in earlier.variants:
            raise MergeError(f"{state}: holds variant {index} already; it is not folded twice")
        folded = earlier.combine(folded)
    folded.save(output)
    return folded


def combine_states(paths: Sequence[str | os.PathLike]) -> PartialMerge:
    """The partial states of `paths` combined (disjoint variants, or a MergeError)."""
    if not paths:
        raise MergeError("no merge states given")
    states = sorted((PartialMerge.load(p) for p in paths), key=lambda s: min(s.variants, default=0))
    combined = states[0]
    for state in states[1:]:
        combined = combined.combine(state)
    return combined


def write_merged(
    partial: PartialMerge,
    output: str | os.PathLike,
    input_sha256: Sequence[str] = (),
    layout: str = "auto",
) -> MergeResult:
    """Finish `partial` into a task-vector file at `output`, as merge_files writes one (the
    same metadata; sparse, or dense where that is smaller or asked for)."""
    merged = partial.finish(numpy=True)
    method: MergeMethod = partial.method
    specs = {key: TensorSpec("F32", tuple(value.shape)) for key, value in merged.items()}
    metadata = {
        "format": OUTPUT_FORMAT,
        "method": method.name,
        "params": json.dumps(method.params.model_dump(), sort_keys=True),
        "n": str(partial.n),
        "input_sha256": json.dumps(list(input_sha256)),
    }
    kept = {key: kept_count(value) for key, value in merged.items()}
    total = sum(value.size for value in merged.values())
    fraction = sum(kept.values()) / max(total, 1)
    metadata["kept_fraction"] = f"{fraction:.6f}"
    writer_type = SafetensorsWriter if layout == "dense" else SparseWriter
    with writer_type(output, specs, metadata, reserve=256) as writer:
        for key, value in merged.items():
            writer.write(key, value.reshape(-1))
    written = "dense" if layout == "dense" else "sparse"
    if layout == "auto" and os.path.getsize(output) > 4 * total:
        replace_with_dense(output)
        written = "dense"
    return MergeResult(
        method=method.name,
        params=method.params.model_dump(),
        n=partial.n,
        kept_fraction=fraction,
        kept_per_tensor={k: kept[k] / max(merged[k].size, 1) for k in merged},
        input_sha256=list(input_sha256),
        output=str(Path(output)),
        layout=written,
        output_bytes=os.path.getsize(output),
        dense_bytes=4 * total,
    )
