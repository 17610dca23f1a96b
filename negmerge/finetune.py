"""Fine-tuning one variant on the forget set, giving its task vector tau_k.

Deterministic for a seed on CPU (same seed, same tau bit for bit, whatever the number of
loader workers and whether images are kept decoded): the data order, the RandAugment draws and
the initialisation all come from seeded generators (negmerge.loading). On CUDA it trains under
bf16 autocast, from pinned memory.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from negmerge.data import Manifest, Sample
from negmerge.errors import DivergedError, NegMergeError
from negmerge.loading import (
    DecodedImages,
    LoaderOptions,
    TrainingImages,
    steps_per_epoch,
    to_device,
    training_loader,
)
from negmerge.models.base import UnlearningModel
from negmerge.variants import Variant

# on_step(step, total_steps, loss, images_per_second)
StepCallback = Callable[[int, int, float, float], None]


def finetune_task_vector(
    model: UnlearningModel,
    manifest: Manifest,
    samples: Sequence[Sample],
    variant: Variant,
    device: str = "cpu",
    on_step: StepCallback | None = None,
    loader_options: LoaderOptions | None = None,
    decoded: DecodedImages | None = None,
) -> dict[str, torch.Tensor]:
    """Fine-tune `model` on `samples` with `variant`'s hyperparameters and return tau (fp32).

    The model's weights are restored afterwards, so one loaded model serves every variant.
    `on_step(step, total_steps, loss, images_per_second)` runs after each step (the rate
    over the step, data waits included); raising from it stops training (that is how a job
    is cancelled between steps). `decoded`: the samples' prepared images, kept by the caller
    across variants (`prepare_images`); without it the run keeps its own.
    """
    options = loader_options or LoaderOptions()
    seed = 0 if variant.seed is None else variant.seed  # a job resolves seeds; a bare call: 0
    _seed_everything(seed)
    module = model.module
    state = module.state_dict()
    pretrained = {key: value.detach().clone() for key, value in state.items()}
    pipeline = model.train_pipeline(variant.augment, variant.preprocess)
    columns = _loss_columns(variant, model.classes, samples)
    if columns is not None:  # class index -> position among the forget set's classes
        positions = torch.full((len(model.classes),), -1, dtype=torch.long)
        positions[columns] = torch.arange(len(columns))
        columns, positions = columns.to(device), positions.to(device)
    workers = options.workers_for(device)
    if decoded is None:
        decoded = prepare_images(model, manifest, samples, options, device)
    data = TrainingImages(manifest, samples, model.classes, pipeline, seed, decoded)
    total = variant.steps or variant.epochs * steps_per_epoch(len(data), variant.batch_size)
    on_cuda = device.startswith("cuda")
    loader = training_loader(data, variant.batch_size, total, workers, pin_memory=on_cuda)
    forward = torch.compile(module) if options.compile else module
    parameters = model.trainable_parameters()
    optimizer = _optimizer(variant, parameters)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(variant.warmup_steps, total)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=variant.label_smoothing)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    module.train()
    if variant.batch_norm == "frozen":
        _freeze_batch_norm(module)
    step = 0
    try:
        began = time.perf_counter()
        while step < total:
            for images, labels in loader:
                count = len(labels)
                images, labels = to_device(images, labels, device, options.channels_last)
                with autocast:
                    logits = forward(images)
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
                    value = loss.detach().item()  # waits for the step: the rate is true
                    on_step(step, total, value, count / max(time.perf_counter() - began, 1e-9))
                began = time.perf_counter()  # the next step's wait for data counts, not on_step
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


def prepare_images(
    model: UnlearningModel,
    manifest: Manifest,
    samples: Sequence[Sample],
    options: LoaderOptions | None = None,
    device: str = "cpu",
) -> DecodedImages:
    """The samples decoded and resized once (up to the options' byte bound), for every
    variant of a job: the prepare step does not depend on a variant's augmentation."""
    options = options or LoaderOptions()
    prepare = model.train_pipeline(None).prepare
    workers = options.workers_for(device)
    return DecodedImages.build(manifest, samples, prepare, options.decoded_cache_bytes, workers)


def _freeze_batch_norm(module: nn.Module) -> None:
    """Batch norm layers normalise with their running statistics and leave them as they are;
    their affine weights still train. The unlearned model is evaluated with theta_pre's
    statistics (tau covers parameters only), so the gradient is taken as it will be used; in
    train mode it would follow a forget set's batch statistics (often those of one class),
    and on the digits classifier the negated tau then broke retain accuracy before forget
    accuracy fell (lambda 0 on some trainings of the same recipe)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


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


def device_usage(device: str) -> dict[str, float] | None:
    """The accelerator's use by this process on a CUDA `device` (None on CPU): memory
    allocated now and at peak (MiB), and the GPU's utilisation (percent, over the driver's
    last sample period) where NVML's Python binding (pynvml: the `gpu` extra) is installed."""
    if not device.startswith("cuda"):
        return None
    usage = {
        "memory_allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
        "memory_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
    }
    # No pynvml, or no NVML for this device: memory only.
    with contextlib.suppress(Exception):
        usage["utilization_percent"] = float(torch.cuda.utilization(device))
    return usage
