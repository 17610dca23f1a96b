"""open_clip models as zero-shot classifiers: the paper's main case.

The head is built as the NegMerge and task_vectors code build it: per class, encode every
prompt template, L2-normalise each embedding, average, normalise again; logits are
logit_scale.exp() * normalised image features @ head.T. Fine-tuning trains the image tower with
the head frozen; the text tower is not part of the task vector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
from torch import nn

from negmerge.errors import NegMergeError
from negmerge.linearize import linearize_model
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
    name = _model_name(spec)
    # On the default device: open_clip moves the model to `device` (cpu unless told), which
    # a model built on the meta device cannot do.
    with _root_log_level(logging.ERROR):  # "No pretrained weights loaded": as asked
        return open_clip.create_model(
            name,
            pretrained=None,
            force_image_size=spec.image_size,
            device=torch.get_default_device(),
        )


def load_open_clip(spec: ModelSpec, device: str = "cpu", linear: bool = False) -> UnlearningModel:
    name = _model_name(spec)
    pretrained = None if spec.weights else _pretrained_tag(spec, name)
    with _root_log_level(logging.ERROR if spec.weights else logging.NOTSET):
        # open_clip warns "No pretrained weights loaded" although the weights follow below.
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, force_image_size=spec.image_size
        )
    deltas = load_weights(model, spec.weights, spec.architecture, linear) if spec.weights else {}
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(name)
    head = zero_shot_head(model, tokenizer, spec.classes, spec.templates, device)
    classifier = ZeroShotClassifier(model.visual, head, model.logit_scale.exp().item())
    tau_keys = [name for name, _ in classifier.named_parameters()]
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    loaded = UnlearningModel(
        module=classifier,
        classes=list(spec.classes),
        tau_keys=tau_keys,
        eval_transform=preprocess,
        mean=tuple(mean),
        full_state=lambda: {k: v.detach().cpu() for k, v in model.state_dict().items()},
        linearized_part="visual",
    )
    if linear:
        linearize_model(loaded, {k: v.to(device) for k, v in deltas.items()})
    return loaded


# The root logger's level is the process's: models built on several threads at once (the
# API checks registrations on its thread pool) must not restore each other's levels.
_ROOT_LEVEL_LOCK = threading.Lock()


@contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    with _ROOT_LEVEL_LOCK:
        root = logging.getLogger()
        previous = root.level
        if level:
            root.setLevel(level)
        try:
            yield
        finally:
            root.setLevel(previous)


def _model_name(spec: ModelSpec) -> str:
    """The name open_clip knows the model by: the architecture, or for a custom config a
    name of its own (see `_register_config`)."""
    if spec.model_config_path:
        return _register_config(spec.model_config_path)
    if spec.architecture not in open_clip.list_models():
        raise NegMergeError(
            f"architecture: open_clip knows no model {spec.architecture!r} "
            "(give model_config_path for a custom one)"
        )
    return spec.architecture


def _pretrained_tag(spec: ModelSpec, name: str) -> str | None:
    """open_clip's `pretrained` is a tag or a file path; a description may only name a tag."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    if spec.pretrained and spec.pretrained not in tags:
        raise NegMergeError(
            f"pretrained: {spec.pretrained!r} is not one of open_clip's tags for {name} "
            f"({', '.join(tags) or 'none'}); give local weights as `weights`"
        )
    return spec.pretrained


def _register_config(path: str) -> str:
    """Add a custom config to open_clip's registry, which is by file name and shared by the
    whole process: named after its content, so that one model's config can never stand in
    for a built-in architecture or another model's config of the same name."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NegMergeError(f"model_config_path: cannot read {path}: {exc}") from None
    text = json.dumps(config, sort_keys=True)
    name = f"negmerge-config-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    folder = Path(tempfile.gettempdir()) / "negmerge-open-clip-configs"
    folder.mkdir(exist_ok=True)
    target = folder / f"{name}.json"
    if not target.exists():  # written whole, then renamed: other processes may read it
        partial = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(text)
        os.replace(partial, target)
    open_clip.add_model_config(target)
    return name
