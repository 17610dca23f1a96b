"""Linearized (tangent-space) models: fine-tuning in the tangent space of the pretrained model.

    f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)

as in Linear Task Arithmetic (Ortiz-Jimenez et al., 2023), which NegMerge's Exp. 1 also runs.
`linearize(module)` replaces a module's forward by its tangent model at its current
parameters theta0. The module's own parameters keep holding theta, under the same names, so
the optimiser, the task vector (theta - theta0), the lambda search (which writes
theta0 - lambda * tau into the parameters) and the checkpoint keys are those of standard
fine-tuning; only what the forward computes differs. The tangent is one forward-mode
`torch.func.jvp` through `functional_call` of a frozen copy of the module: no hand-written
derivatives, and ordinary autograd differentiates it with respect to theta.

The function is always evaluated in eval mode at theta0's buffers (as the official code
linearizes `init_model.eval()`): BatchNorm uses its running statistics, dropout is off, so
f_lin is one fixed function of theta.

A linearized checkpoint (what a linear job's model version stores) holds theta0 under the
model's own keys, bit for bit the weights it was linearized at, and delta = theta - theta0 in
fp32 under `DELTA_PREFIX + key` (fp32 because a small delta added to fp16/bf16 weights would
round away). Its metadata says `finetuning: linear` and which part is linearized.
`negmerge.models.load_linearized` loads it as a module whose forward is the tangent model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from negmerge.errors import CheckpointError
from negmerge.io import torch_dtype
from negmerge.job_spec import Finetuning

if TYPE_CHECKING:
    from negmerge.models.base import UnlearningModel

DELTA_PREFIX = "tangent_delta."
# Metadata keys of a linearized checkpoint.
FINETUNING_KEY = "finetuning"
PART_KEY = "linearized_part"


class TangentForward:
    """The tangent model of `module` at its parameters when this was made (theta0).

    Called with the module's inputs, it computes f(x; theta0) + J f(x; theta0) (theta - theta0)
    where theta is the module's current parameters. Not an nn.Module: it is installed as the
    module's `forward`, and must not add parameters or keys to it.
    """

    def __init__(self, module: nn.Module) -> None:
        # The copy holds theta0 and the buffers; it never trains and is never moved by
        # `module.to()`, so it is made on the device the module is on when linearized.
        self.function = copy.deepcopy(module).eval().requires_grad_(False)
        self.origin = dict(self.function.named_parameters())
        self.buffers = dict(self.function.named_buffers())
        self.live = module

    def __call__(self, *args: object) -> torch.Tensor:
        theta = dict(self.live.named_parameters())
        delta = {name: theta[name] - theta0 for name, theta0 in self.origin.items()}

        def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.function, {**params, **self.buffers}, args)

        with _forward_ad_kernels():
            out, tangent = jvp(f, (self.origin,), (delta,))
        return out + tangent


@contextmanager
def _forward_ad_kernels() -> Iterator[None]:
    """Kernels that have forward-mode derivatives: nn.MultiheadAttention's fused inference
    path (which a frozen eval-mode copy takes) has none, nor have the flash and
    memory-efficient attention kernels; the math attention computes the same thing."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def linearize(module: nn.Module) -> TangentForward:
    """Make `module`'s forward its tangent model at its current parameters, in place."""
    if isinstance(module.forward, TangentForward):
        raise ValueError("the module is already linearized")
    tangent = TangentForward(module)
    module.forward = tangent  # an instance attribute: nn.Module.__call__ finds it first
    return tangent


def tangent_of(module: nn.Module) -> TangentForward | None:
    """The TangentForward installed on `module`, or None for a standard module."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, TangentForward) else None


def origin_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """theta0 of a linearized module, by parameter name (within the module)."""
    tangent = tangent_of(module)
    if tangent is None:
        raise ValueError("the module is not linearized")
    return tangent.origin


def split_deltas(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's plain tensors (theta0) and its tangent deltas (keyed without prefix)."""
    plain = {k: v for k, v in state.items() if not k.startswith(DELTA_PREFIX)}
    deltas = {k[len(DELTA_PREFIX) :]: v for k, v in state.items() if k.startswith(DELTA_PREFIX)}
    unknown = [key for key in deltas if key not in plain]
    if unknown:
        raise CheckpointError(f"tangent delta {unknown[0]!r} has no weight of that name")
    return plain, deltas


def is_linearized(metadata: Mapping[str, str]) -> bool:
    """Whether a checkpoint's metadata says it is a linearized checkpoint."""
    return metadata.get(FINETUNING_KEY) == "linear"


def checkpoint_finetuning(path: str) -> Finetuning:
    """The finetuning mode a checkpoint file was made with (its header is all that is read)."""
    from negmerge.io import open_checkpoint

    with open_checkpoint(path, hashing=False) as checkpoint:
        return "linear" if is_linearized(checkpoint.metadata) else "standard"


def linearized_metadata(part: str) -> dict[str, str]:
    return {FINETUNING_KEY: "linear", PART_KEY: part}


def linearize_model(model: UnlearningModel, deltas: Mapping[str, torch.Tensor]) -> None:
    """Linearize `model` (its `linearized_part`) at its loaded weights theta0, then move it to
    theta0 + delta: the tangent model a linearized checkpoint describes (no deltas: theta0,
    where a linear job on standard weights starts). `model.full_state()` then gives the
    linearized checkpoint's tensors."""
    part = model.module.get_submodule(model.linearized_part)
    prefix = f"{model.linearized_part}." if model.linearized_part else ""
    outside = [key for key in model.tau_keys if not key.startswith(prefix)]
    if outside:  # an adapter whose task vector reaches past the linearized part
        raise ValueError(f"tau key {outside[0]!r} is outside the linearized part {prefix!r}")
    unknown = [key for key in deltas if key not in set(model.tau_keys)]
    if unknown:
        raise CheckpointError(f"tangent delta {unknown[0]!r} is not a parameter the model trains")
    linearize(part)
    origin = origin_state(part)
    params = dict(model.module.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            params[key].add_(delta.to(params[key].device, params[key].dtype))
    standard_state = model.full_state

    def linearized_state() -> dict[str, torch.Tensor]:
        state = standard_state()  # theta for the trained keys
        for key in model.tau_keys:
            theta0 = origin[key[len(prefix) :]].detach().cpu()
            state[DELTA_PREFIX + key] = state[key].float() - theta0.float()
            state[key] = theta0
        return state

    model.full_state = linearized_state
    model.finetuning = "linear"


def apply_tangent_file(
    base: str | os.PathLike,
    vector: str | os.PathLike,
    scale: float,
    output: str | os.PathLike,
    part: str,
) -> dict[str, str]:
    """Stream the linearized checkpoint theta0, delta - scale * tau into `output`.

    `base` is a linearized checkpoint (its deltas zero for a job on standard weights); theta0
    is copied as it is and each tangent delta moves by -scale * tau, in fp32. The linear
    counterpart of `negmerge.task_vector.subtract_task_vector_file`; returns the metadata.
    """
    from negmerge.io import SafetensorsWriter, open_checkpoint, refuse_overwriting
    from negmerge.task_vector import CHUNK_ELEMENTS

    refuse_overwriting(output, [base, vector])
    with open_checkpoint(base) as pre, open_checkpoint(vector) as tau:
        if not is_linearized(pre.metadata):
            raise CheckpointError(f"{pre.path}: not a linearized checkpoint")
        for key, spec in tau.specs.items():
            ours = pre.specs.get(DELTA_PREFIX + key)
            if ours is None or ours.shape != spec.shape:
                raise CheckpointError(f"{tau.path}: key {key!r} has no tangent delta of its shape")
        metadata = {"format": "negmerge.model", "scale": repr(float(scale))}
        metadata |= linearized_metadata(part)
        with SafetensorsWriter(output, pre.specs, metadata) as writer:
            for key, spec in pre.specs.items():
                covered = key.startswith(DELTA_PREFIX) and key[len(DELTA_PREFIX) :] in tau.specs
                for start in range(0, spec.numel, CHUNK_ELEMENTS):
                    stop = min(start + CHUNK_ELEMENTS, spec.numel)
                    value = pre.read(key, start, stop)
                    if covered:
                        step = tau.read(key[len(DELTA_PREFIX) :], start, stop).float()
                        value = torch.sub(value.float(), step, alpha=scale)
                    writer.write(key, value.to(torch_dtype(spec.dtype)))
            writer.metadata["sources"] = json.dumps(
                {"pretrained_sha256": pre.sha256(), "vector_sha256": tau.sha256()}
            )
        return writer.metadata
