"""Tiny checkpoints written to disk, shared by the library's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from negmerge.io import save_file


def make_model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model's state dict: float weights of several shapes, an integer buffer, a bf16."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(37, 29, generator=gen),
        "encoder.bias": torch.randn(29, generator=gen),
        "norm.running_mean": torch.randn(29, generator=gen),
        "norm.num_batches_tracked": torch.tensor(7),
        "head.weight": torch.randn(11, 29, generator=gen).bfloat16(),
        "mask": torch.ones(5, dtype=torch.bool),
    }


def finetune_like(pre: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A perturbed copy of `pre`, as fine-tuning would leave it (integer buffers move too)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for key, value in pre.items():
        if value.is_floating_point():
            noise = 0.1 * torch.randn(value.shape, generator=gen)
            out[key] = (value.float() + noise).to(value.dtype)
        else:
            out[key] = value + 1 if value.dtype != torch.bool else value.clone()
    return out


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, list[Path], dict, list[dict]]:
    """A pretrained checkpoint and four fine-tuned ones on disk, and their state dicts."""
    pre = make_model_state()
    save_file(pre, tmp_path / "pre.safetensors")
    fts, paths = [], []
    for k in range(4):
        ft = finetune_like(pre, k)
        path = tmp_path / f"ft{k}.safetensors"
        save_file(ft, path)
        fts.append(ft)
        paths.append(path)
    return tmp_path / "pre.safetensors", paths, pre, fts
