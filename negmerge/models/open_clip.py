"""open_clip models as zero-shot classifiers: the paper's main case.

The head is built as the NegMerge and task_vectors code build it: per class, encode every
prompt template, L2-normalise each embedding, average, normalise again; logits are
logit_scale.exp() * normalised image features @ head.T. Fine-tuning trains the image tower with
the head frozen; the text tower is not part of the task vector.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
from torch import nn

from negmerge.errors import NegMergeError
from negmerge.models import ModelSpec
from negmerge.models.base import UnlearningModel, load_weights


class ZeroShotClassifier(nn.Module):
    """CLIP's image tower and a frozen text-derived head. The tower is the attribute `visual`,
    so its state-dict keys match the full CLIP checkpoint's (visual.*)."""

    def __init__(self, visual: nn.Module, head: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head, persistent=False)
        self.logit_scale = logit_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.visual(images)
        features = features / features.norm(dim=-1, keepdim=True)
        return self.logit_scale * features @ self.head.T


@torch.no_grad()
def zero_shot_head(
    model: open_clip.CLIP, tokenizer, classes: list[str], templates: list[str], device: str
) -> torch.Tensor:
    """(classes, embed_dim) text embeddings, one averaged, normalised row per class."""
    rows = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        embeddings = model.encode_text(tokens)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def build_module(spec: ModelSpec) -> nn.Module:
    """The whole CLIP model `spec` describes (both towers, as its checkpoints hold it),
    without weights."""
    _check_architecture(spec)
    # On the default device: open_clip moves the model to `device` (cpu unless told), which
    # a model built on the meta device cannot do.
    with _root_log_level(logging.ERROR):  # "No pretrained weights loaded": as asked
        return open_clip.create_model(
            spec.architecture,
            pretrained=None,
            force_image_size=spec.image_size,
            device=torch.get_default_device(),
        )


def load_open_clip(spec: ModelSpec, device: str = "cpu") -> UnlearningModel:
    _check_architecture(spec)
    pretrained = None if spec.weights else spec.pretrained
    with _root_log_level(logging.ERROR if spec.weights else logging.NOTSET):
        # open_clip warns "No pretrained weights loaded" although the weights follow below.
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.architecture, pretrained=pretrained, force_image_size=spec.image_size
        )
    if spec.weights:
        load_weights(model, spec.weights, spec.architecture)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(spec.architecture)
    head = zero_shot_head(model, tokenizer, spec.classes, spec.templates, device)
    classifier = ZeroShotClassifier(model.visual, head, model.logit_scale.exp().item())
    tau_keys = [name for name, _ in classifier.named_parameters()]
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    return UnlearningModel(
        module=classifier,
        classes=list(spec.classes),
        tau_keys=tau_keys,
        eval_transform=preprocess,
        mean=tuple(mean),
        full_state=lambda: {k: v.detach().cpu() for k, v in model.state_dict().items()},
    )


@contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    if level:
        root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


def _check_architecture(spec: ModelSpec) -> None:
    if spec.model_config_path:
        _register_config(spec.architecture, spec.model_config_path)
    if spec.architecture not in open_clip.list_models():
        raise NegMergeError(
            f"architecture: open_clip knows no model {spec.architecture!r} "
            "(give model_config_path for a custom one)"
        )


def _register_config(name: str, path: str) -> None:
    """open_clip finds custom configs by file name, so copy it under `name`.json."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NegMergeError(f"model_config_path: cannot read {path}: {exc}") from None
    folder = Path(tempfile.gettempdir()) / "negmerge-open-clip-configs"
    folder.mkdir(exist_ok=True)
    target = folder / f"{name}.json"
    target.write_text(json.dumps(config))
    open_clip.add_model_config(target)
