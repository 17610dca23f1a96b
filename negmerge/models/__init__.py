"""The models NegMerge edits, each family behind one small adapter.

An adapter turns a model description into a classifier module (images -> logits over the
model's classes) and says which of its state-dict keys a task vector covers. For CLIP that is
the image tower: the zero-shot head is frozen and the text tower is not part of tau.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from negmerge.errors import NegMergeError

if TYPE_CHECKING:
    from torch import nn

    from negmerge.models.base import UnlearningModel

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {}.", "an image of a {}."]


class ModelSpec(BaseModel):
    """Where a model comes from and what it classifies."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    family: Literal["open_clip", "classifier"]
    architecture: str = Field(
        description="open_clip model name (ViT-B-32, ...) or a custom config's name; a timm "
        "model name (resnet18, ...) or an architecture the operator installed (entry-point "
        "group negmerge.architectures). A name, never an import path.",
        examples=["ViT-B-32", "resnet18"],
    )
    classes: list[str] = Field(min_length=2, description="Class names, in the model's order.")
    weights: str | None = Field(
        None, description="Local safetensors or PyTorch state-dict file with the weights."
    )
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (needs the model hub).", examples=["openai"]
    )
    model_config_path: str | None = Field(
        None, description="open_clip: JSON config of a custom architecture named `architecture`."
    )
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        description="open_clip: prompt templates for the zero-shot head, '{}' is the class name.",
    )
    init_args: dict[str, object] = Field(
        default_factory=dict,
        description="classifier: keyword arguments among the architecture's declared "
        "parameters (timm: drop_rate, drop_path_rate, in_chans, global_pool).",
    )
    image_size: int | None = Field(None, gt=0, description="Override the input size.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: names must be unique")
        if self.family == "open_clip" and not all("{}" in t for t in self.templates):
            raise ValueError("templates: each must contain '{}' for the class name")
        if self.family == "classifier" and self.pretrained:
            raise ValueError("pretrained: only for open_clip; give classifier weights as a file")
        if self.family == "open_clip" and self.init_args:
            raise ValueError("init_args: open_clip models take none")
        if self.family == "classifier":
            from negmerge.models.architectures import check_classifier

            try:
                # Nothing imported: descriptions are validated in the API process too.
                check_classifier(self.architecture, self.init_args, load=False)
            except NegMergeError as exc:
                raise ValueError(str(exc)) from None
        return self


def load_model(
    spec: ModelSpec, device: str = "cpu", finetuning: Literal["standard", "linear"] = "standard"
) -> UnlearningModel:
    """Build the model `spec` describes, with its weights, on `device`.

    With finetuning "linear" the model is linearized at its weights (negmerge.linearize): its
    forward is the tangent model, and a linearized checkpoint's delta is applied; standard
    loading refuses a linearized checkpoint.
    """
    linear = finetuning == "linear"
    if spec.family == "open_clip":
        from negmerge.models.open_clip import load_open_clip

        return load_open_clip(spec, device, linear)
    from negmerge.models.classifier import load_classifier

    return load_classifier(spec, device, linear)


def load_linearized(spec: ModelSpec, device: str = "cpu") -> nn.Module:
    """The model a linear job stored (`spec.weights`: its linearized checkpoint, theta0 and
    the scaled delta) as a module in eval mode whose forward is the tangent model
    f(x; theta0) + J f(x; theta0) delta: images in, logits over `spec.classes` out."""
    from negmerge.linearize import checkpoint_finetuning

    if not spec.weights:
        raise NegMergeError("weights: give the linearized checkpoint's path")
    if checkpoint_finetuning(spec.weights) != "linear":
        raise NegMergeError(
            f"weights: {spec.weights} is a standard checkpoint, not a linearized one; load it "
            "with negmerge.models.load_model"
        )
    return load_model(spec, device, "linear").module.eval()


def check_weights(spec: ModelSpec) -> None:
    """Raise NegMergeError unless `spec.weights` loads strictly into the model `spec`
    describes, as a job would load it. Cheap enough for a request: the model is built on
    PyTorch's meta device (shapes, no memory) and loads stand-ins of the file's tensors (a
    safetensors file's header is all that is read)."""
    import torch

    from negmerge.io import open_checkpoint

    if spec.family == "open_clip":
        from negmerge.models.open_clip import build_module
    else:
        from negmerge.models.classifier import build_module
    try:
        with torch.device("meta"):
            module = build_module(spec)
    except (NegMergeError, MemoryError):  # a MemoryError: past the caller's memory limit
        raise
    except TypeError as exc:  # keyword arguments the architecture does not take
        raise NegMergeError(f"init_args: {spec.architecture} cannot be built: {exc}") from None
    except Exception as exc:  # an architecture that cannot be built without memory
        log.info("weights of %s not checked: %s", spec.architecture, exc)
        return
    with open_checkpoint(spec.weights, hashing=False) as checkpoint:
        layout = {key: tuple(tensor.shape) for key, tensor in checkpoint.specs.items()}
    stand_ins = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    try:  # torch's own rules: e.g. BatchNorm accepts a checkpoint without num_batches_tracked
        module.load_state_dict(stand_ins, strict=True, assign=True)
    except RuntimeError as exc:
        raise NegMergeError(
            f"does not fit {spec.architecture}: {_first_problem(module, layout, exc)}"
        ) from None


def _first_problem(module: nn.Module, layout: dict[str, tuple[int, ...]], exc: Exception) -> str:
    """The first key torch refused, in a line (its own message lists every key)."""
    expected = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    problems = [
        *(f"missing key {key!r}" for key in expected if key not in layout and key in str(exc)),
        *(f"unexpected key {key!r}" for key in layout if key not in expected),
        *(
            f"key {key!r} is shaped {list(layout[key])}, the model's {list(expected[key])}"
            for key in expected
            if key in layout and layout[key] != expected[key]
        ),
    ]
    if not problems:
        return str(exc).splitlines()[-1].strip()
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def __getattr__(name: str) -> object:
    # UnlearningModel needs torch; the schema (ModelSpec) must not, so it is imported on use.
    if name == "UnlearningModel":
        from negmerge.models.base import UnlearningModel

        return UnlearningModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ModelSpec", "UnlearningModel", "check_weights", "load_linearized", "load_model"]
