"""Task vectors: tau = theta_ft - theta_pre, and applying theta = theta_pre - lambda * tau.

Only floating-point tensors take part. Integer and bool tensors (BatchNorm's
num_batches_tracked, masks) are not part of tau; whenever a model is rebuilt they are carried
over from theta_pre unchanged, so the result still loads strictly into the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping

import torch

from negmerge.errors import CheckpointError
from negmerge.io import (  # noqa: F401 (check_same_layout, float_keys: this module's API too)
    SafetensorsWriter,
    check_same_layout,
    float_keys,
    load_state_dict,
    open_checkpoint,
    refuse_overwriting,
    torch_dtype,
)

CHUNK_ELEMENTS = 1 << 20


def task_vector(
    pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """tau = theta_ft - theta_pre over the floating-point tensors, in fp32."""
    missing = [key for key in pretrained if key not in finetuned]
    if missing:
        raise CheckpointError(f"fine-tuned state dict lacks key {missing[0]!r}")
    tau = {}
    for key, pre in pretrained.items():
        if not pre.is_floating_point():
            continue
        ft = finetuned[key]
        if ft.shape != pre.shape:
            raise CheckpointError(f"key {key!r}: shape {list(ft.shape)} vs {list(pre.shape)}")
        tau[key] = ft.detach().float() - pre.detach().float()
    return tau


def load_task_vector(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """A task-vector file as a mapping of torch tensors. A sparse file (negmerge.sparse) stays
    sparse in memory and each tensor is densified only when looked up, so `subtract_task_vector`,
    which takes them one at a time, holds one dense tensor at most; a dense file is loaded."""
    from negmerge.sparse import SparseFile, SparseTensors

    with open_checkpoint(path) as ckpt:
        sparse = isinstance(ckpt, SparseFile)
    return SparseTensors(path) if sparse else load_state_dict(path)


def subtract_task_vector(
    pretrained: Mapping[str, torch.Tensor],
    vector: Mapping[str, torch.Tensor],
    scale: float,
    out: MutableMapping[str, torch.Tensor] | None = None,
) -> MutableMapping[str, torch.Tensor]:
    """theta = theta_pre - scale * tau, computed in fp32 and stored in theta_pre's dtypes.

    Tensors the vector does not cover (integer buffers, a frozen tower) are carried over from
    theta_pre. With `out` (e.g. a model's state_dict(), whose tensors share the parameters'
    memory, already holding theta_pre) only the covered tensors are rewritten, in place, so
    searching many scales copies nothing.
    """
    unknown = [key for key in vector if key not in pretrained]
    if unknown:
        raise CheckpointError(f"task vector key {unknown[0]!r} is not in the pretrained model")
    result = {} if out is None else out
    for key, pre in pretrained.items():
        tau = vector.get(key)
        if tau is None:
            if out is None:
                result[key] = pre.clone()
            continue
        if tau.shape != pre.shape:
            raise CheckpointError(f"key {key!r}: vector {list(tau.shape)} vs {list(pre.shape)}")
        value = torch.sub(pre.float(), tau.float(), alpha=scale)
        if out is None:
            result[key] = value.to(pre.dtype)
        else:
            with torch.no_grad():
                out[key].copy_(value)
    return result


def subtract_task_vector_file(
    pretrained: str | os.PathLike,
    vector: str | os.PathLike,
    scale: float,
    output: str | os.PathLike,
) -> dict[str, str]:
    """Stream theta_pre - scale * tau into a safetensors file; returns the output metadata.

    Works tensor slice by tensor slice, so memory stays small whatever the model's size.
    """
    refuse_overwriting(output, [pretrained, vector])
    with open_checkpoint(pretrained) as pre, open_checkpoint(vector) as tau:
        for key, spec in tau.specs.items():
            ours = pre.specs.get(key)
            if not spec.is_float:
                raise CheckpointError(
                    f"{tau.path}: key {key!r} is {spec.describe()}; a task vector holds only "
                    "floating-point tensors (is this a model checkpoint? `negmerge merge` "
                    "makes task vectors)"
                )
            if ours is None:
                raise CheckpointError(f"{tau.path}: key {key!r} is not in {pre.path.name}")
            if ours.shape != spec.shape or not ours.is_float:
                raise CheckpointError(
                    f"{tau.path}: key {key!r} is {spec.describe()}, "
                    f"but {ours.describe()} in {pre.path.name}"
                )
        metadata = {"format": "negmerge.model", "scale": repr(float(scale))}
        with SafetensorsWriter(output, pre.specs, metadata) as writer:
            for key, spec in pre.specs.items():
                for start in range(0, spec.numel, CHUNK_ELEMENTS):
                    stop = min(start + CHUNK_ELEMENTS, spec.numel)
                    value = pre.read(key, start, stop)
                    if key in tau.specs:
                        delta = tau.read(key, start, stop).float()
                        value = torch.sub(value.float(), delta, alpha=scale)
                    writer.write(key, value.to(torch_dtype(spec.dtype)))
            writer.metadata["sources"] = json.dumps(
                {"pretrained_sha256": pre.sha256(), "vector_sha256": tau.sha256()}
            )
        return writer.metadata
