"""Ordinary image classifiers: timm models by name, or architectures the operator installed
(negmerge.models.architectures)."""

from __future__ import annotations

import timm
import timm.data
from torch import nn
from torchvision import transforms

from negmerge.linearize import linearize_model
from negmerge.models import ModelSpec
from negmerge.models.architectures import classifier_architecture
from negmerge.models.base import UnlearningModel, load_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_classifier(spec: ModelSpec, device: str = "cpu", linear: bool = False) -> UnlearningModel:
    module = build_module(spec)
    deltas = load_weights(module, spec.weights, spec.architecture, linear) if spec.weights else {}
    module = module.to(device).eval()
    eval_transform, mean = _eval_transform(module, spec)
    tau_keys = [name for name, _ in module.named_parameters()]
    loaded = UnlearningModel(
        module=module,
        classes=list(spec.classes),
        tau_keys=tau_keys,
        eval_transform=eval_transform,
        mean=mean,
        full_state=lambda: {k: v.detach().cpu() for k, v in module.state_dict().items()},
    )
    if linear:
        linearize_model(loaded, {k: v.to(device) for k, v in deltas.items()})
    return loaded


def build_module(spec: ModelSpec) -> nn.Module:
    """The module `spec` describes, without its weights. The architecture is looked up by
    name and its init_args checked against its declared parameters, even for a spec that
    skipped validation (one read from a database): nothing a spec names is imported."""
    architecture = classifier_architecture(spec.architecture)
    arguments = architecture.arguments(spec.architecture, spec.init_args)
    return architecture.build(num_classes=len(spec.classes), **arguments)


def _eval_transform(module: nn.Module, spec: ModelSpec):
    if hasattr(module, "pretrained_cfg"):  # a timm model knows its preprocessing
        config = timm.data.resolve_data_config({}, model=module)
        if spec.image_size:
            config["input_size"] = (3, spec.image_size, spec.image_size)
            config["crop_pct"] = 1.0
        return timm.data.create_transform(**config, is_training=False), tuple(config["mean"])
    size = spec.image_size or 224
    transform = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return transform, IMAGENET_MEAN
