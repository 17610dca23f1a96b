"""What the pipeline needs from a model, whatever its family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import nn

from negmerge.errors import NegMergeError
from negmerge.io import load_state_dict
from negmerge.loading import TrainPipeline

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class UnlearningModel:
    """A classifier and the facts the unlearning pipeline needs about it.

    `module(images)` gives logits over `classes`. `tau_keys` are the keys of
    `module.state_dict()` that a task vector covers: the learned parameters. Buffers such as
    BatchNorm's running statistics are carried over from the original model: they are
    statistics of the data seen, and negating the shift that fine-tuning on the forget set gave
    them is meaningless (on the digits classifier it raised forget accuracy instead of lowering
    it). Keys are named as in `full_state()`, the model's complete checkpoint (for CLIP: with
    the text tower), so a task vector applies to the stored checkpoint directly.
    """

    module: nn.Module
    classes: list[str]
    tau_keys: list[str]
    eval_transform: Transform
    mean: tuple[float, ...]
    full_state: Callable[[], dict[str, torch.Tensor]]
    # The submodule that linearized fine-tuning linearizes (negmerge.linearize): CLIP's image
    # tower, as the official code does (the normalisation and the text head stay as they
    # are); a classifier as a whole ("").
    linearized_part: str = ""
    finetuning: Literal["standard", "linear"] = "standard"

    def trainable_parameters(self) -> list[nn.Parameter]:
        covered = set(self.tau_keys)
        return [p for name, p in self.module.named_parameters() if name in covered]

    def train_transform(self, augment: str | None, preprocess: str = "eval") -> Transform:
        """The fine-tuning transform (see `train_pipeline`) as one callable."""
        return self.train_pipeline(augment, preprocess)

    def train_pipeline(self, augment: str | None, preprocess: str = "eval") -> TrainPipeline:
        """The fine-tuning transform, split where its randomness starts.

        `prepare` resizes the decoded image to the model's input resolution as the evaluation
        transform's first step does (the same resize, so that step is then a no-op); it is
        deterministic, so a run does it once per image (negmerge.loading). `augment`: with
        preprocess "train", timm's training geometry first (random resized crop, scale
        0.08..1, back to the image's size, and horizontal flip); then RandAugment (timm's
        `rand-m{M}-n{N}` strings); then the model's evaluation preprocessing. Augmenting at
        the input resolution is what timm's and the official CLIP code's training transforms
        do (their random resized crop outputs it).
        """
        from torchvision import transforms

        steps: list[Transform] = []
        if preprocess == "train":
            steps += [_random_resized_crop, transforms.RandomHorizontalFlip()]
        if augment:
            from timm.data.auto_augment import _RAND_TRANSFORMS, rand_augment_transform

            # timm's Posterize keeps 0 bits at magnitudes below 3, which current Pillow
            # refuses; PosterizeOriginal (keep 4..8 bits) is the same operation in range.
            ops = ["PosterizeOriginal" if op == "Posterize" else op for op in _RAND_TRANSFORMS]
            fill = tuple(round(255 * m) for m in self.mean)
            steps.append(rand_augment_transform(augment, {"img_mean": fill}, transforms=ops))
        prepare = _input_resize(self.eval_transform)
        if not steps:
            return TrainPipeline(prepare, self.eval_transform)
        return TrainPipeline(prepare, transforms.Compose([*steps, self.eval_transform]))


def _input_resize(eval_transform: Transform) -> Transform:
    """The evaluation transform's leading resize, which the training pipeline applies first
    (RGB images too, as decoding gives them); the identity when it has none."""
    from torchvision import transforms

    first = getattr(eval_transform, "transforms", [None])[0]
    if isinstance(first, transforms.Resize):
        return first
    return _identity


def _identity(image: Image.Image) -> Image.Image:
    return image


def _random_resized_crop(image: Image.Image) -> Image.Image:
    """timm's (and torchvision's) RandomResizedCrop, back to the image's own size, so that the
    evaluation transform sizes it as it sizes every other image."""
    from torchvision import transforms
    from torchvision.transforms import functional

    top, left, height, width = transforms.RandomResizedCrop.get_params(
        image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
    )
    return functional.resized_crop(image, top, left, height, width, [image.height, image.width])


def load_weights(
    module: nn.Module, path: str, architecture: str, linear: bool = False
) -> dict[str, torch.Tensor]:
    """Load a checkpoint file strictly, with an error naming the first key that does not fit.

    A linearized checkpoint (negmerge.linearize) loads its theta0 and returns its tangent
    deltas, but only when `linear`: loaded as a standard model it would silently serve
    theta0, the model before unlearning. A standard checkpoint returns no deltas.
    """
    from negmerge.linearize import split_deltas

    state = load_state_dict(path)
    state, deltas = split_deltas(state)
    if deltas and not linear:
        raise NegMergeError(
            f"weights: {path} is a linearized checkpoint (its forward is the tangent model); "
            "load it with negmerge.models.load_linearized, or run a job on it with "
            "finetuning 'linear'"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise NegMergeError(f"weights: {path} does not fit {architecture}: {detail}") from None
    return deltas
