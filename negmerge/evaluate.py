"""Evaluating a classifier on fixed image sets, many times (once per lambda) and cheaply.

Images are decoded and preprocessed once into a tensor; each evaluation is then only forward
passes."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from negmerge.data import Manifest, Sample
from negmerge.metrics import accuracy, true_label_probabilities
from negmerge.models.base import UnlearningModel


@dataclass
class EvalSet:
    """A named, preprocessed image set with its labels."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def build(
        cls,
        name: str,
        model: UnlearningModel,
        manifest: Manifest,
        samples: Sequence[Sample],
        limit: int | None = None,
        seed: int = 0,
    ) -> EvalSet:
        """Preprocess `samples` (a seeded random subset of `limit` of them, if given)."""
        samples = list(samples)
        if limit is not None and len(samples) > limit:
            samples = random.Random(seed).sample(samples, limit)
        index = {c: i for i, c in enumerate(model.classes)}
        if not samples:
            return cls(name, torch.empty(0), torch.empty(0, dtype=torch.long))
        images = torch.stack([model.eval_transform(manifest.open(s)) for s in samples])
        labels = torch.tensor([index[s.label] for s in samples])
        return cls(name, images, labels)

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def predict(
    model: UnlearningModel, data: EvalSet, device: str = "cpu", batch_size: int = 256
) -> torch.Tensor:
    """Logits (on the CPU, fp32) for every image of `data`."""
    model.module.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    outputs = []
    for start in range(0, len(data), batch_size):
        with autocast:
            logits = model.module(data.images[start : start + batch_size].to(device))
        outputs.append(logits.float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, len(model.classes))


def evaluate_accuracy(
    model: UnlearningModel, data: EvalSet, device: str = "cpu", batch_size: int = 256
) -> float:
    """Top-1 accuracy in percent."""
    return accuracy(predict(model, data, device, batch_size), data.labels)


def true_label_probs(
    model: UnlearningModel, data: EvalSet, device: str = "cpu", batch_size: int = 256
):
    """Softmax probability of the true label, per image (the MIA feature)."""
    return true_label_probabilities(predict(model, data, device, batch_size), data.labels)
