"""Fine-tuning one variant on the forget set, giving its task vector tau_k.

Deterministic for a seed on CPU (same seed, same tau bit for bit): the data order, the
RandAugment draws and the initialisation all come from seeded generators, and images are
loaded in the main process. On CUDA it trains under bf16 autocast.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from negmerge.data import Manifest, Sample
from negmerge.errors import DivergedError, NegMergeError
from negmerge.models.base import UnlearningModel
from negmerge.variants import Variant

StepCallback = Callable[[int, int, float], None]


def finetune_task_vector(
    model: UnlearningModel,
    manifest: Manifest,
    samples: Sequence[Sample],
    variant: Variant,
    device: str = "cpu",
    on_step: StepCallback | None = None,
) -> dict[str, torch.Tensor]:
    """Fine-tune `model` on `samples` with `variant`'s hyperparameters and return tau (fp32).

    The model's weights are restored afterwards, so one loaded model serves every variant.
    `on_step(step, total_steps, loss)` runs after each step; raising from it stops training
    (that is how a job is cancelled between steps).
    """
    seed = 0 if variant.seed is None else variant.seed  # a job resolves seeds; a bare call: 0
    _seed_everything(seed)
    module = model.module
    state = module.state_dict()
    pretrained = {key: value.detach().clone() for key, value in state.items()}
    transform = model.train_transform(variant.augment, variant.preprocess)
    data = ImageDataset(manifest, samples, model.classes, transform)
    columns = _loss_columns(variant, model.classes, samples)
    if columns is not None:  # class index -> position among the forget set's classes
        positions = torch.full((len(model.classes),), -1, dtype=torch.long)
        positions[columns] = torch.arange(len(columns))
        columns, positions = columns.to(device), positions.to(device)
    loader = DataLoader(
        data,
        batch_size=variant.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=0,
    )
    total = variant.steps or variant.epochs * len(loader)
    parameters = model.trainable_parameters()
    optimizer = _optimizer(variant, parameters)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(variant.warmup_steps, total)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=variant.label_smoothing)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    module.train()
    step = 0
    try:
        while step < total:
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                with autocast:
                    logits = module(images)
                    if columns is not None:  # the forget task's own head
                        logits, labels = logits[:, columns], positions[labels]
                    loss = loss_fn(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if variant.grad_clip is not None:
                    nn.utils.clip_grad_norm_(parameters, variant.grad_clip)
                optimizer.step()
                schedule.step()
                step += 1
                if on_step is not None:
                    on_step(step, total, loss.detach().item())
                if step >= total:
                    break
        finetuned = module.state_dict()
        tau = {
            key: finetuned[key].detach().float().cpu() - pretrained[key].float().cpu()
            for key in model.tau_keys
        }
        check_finite(tau)
        return tau
    finally:
        module.eval()
        with torch.no_grad():
            for key, value in pretrained.items():
                state[key].copy_(value)


def _loss_columns(
    variant: Variant, classes: Sequence[str], samples: Sequence[Sample]
) -> torch.Tensor | None:
    """With head "forget", the model's class indices present in the forget set (the logits the
    loss sees), else None. One class alone gives no gradient, so that is refused."""
    if variant.head == "all":
        return None
    present = sorted({classes.index(s.label) for s in samples})
    if len(present) < 2:
        raise NegMergeError(
            "variants.head: 'forget' needs a forget set of at least two classes; this one has "
            f"{len(present)} (use head 'all')"
        )
    return torch.tensor(present)


def check_finite(tau: dict[str, torch.Tensor]) -> None:
    """Refuse a task vector with NaN or Inf (a diverged run): merged, it would spread them
    into every kept element (the official code zeroes them silently, hiding the failure)."""
    for key, value in tau.items():
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            nan = int(torch.isnan(value).sum())
            inf = value.numel() - int(finite.sum()) - nan
            raise DivergedError(
                f"task vector: {key!r} holds {nan} NaN and {inf} Inf values: the run diverged "
                "(try a lower lr or grad_clip); it is not merged"
            )


class ImageDataset(Dataset):
    """Samples of a manifest as (image tensor, class index) pairs."""

    def __init__(
        self,
        manifest: Manifest,
        samples: Sequence[Sample],
        classes: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.manifest = manifest
        self.samples = list(samples)
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[i]
        return self.transform(self.manifest.open(sample)), self.class_index[sample.label]


def _seed_everything(seed: int) -> None:
    random.seed(seed)  # RandAugment draws from Python's random module
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(variant: Variant, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if variant.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=variant.lr, momentum=variant.momentum, weight_decay=variant.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=variant.lr, weight_decay=variant.weight_decay)


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    # A warmup longer than the run would never reach the peak lr (the official 500 steps on a
    # forget set of a few batches): at most a tenth of the run warms up.
    warmup = min(warmup, total // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
