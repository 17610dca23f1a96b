"""The classifier architectures a model description may name: names, never code.

A description (a tenant's, through the service) names an architecture; it never points at
code or files. Two kinds of names are known:

- timm's models, built without pretrained weights and with only the keyword arguments of
  `TimmParameters`: nothing that fetches from a hub or reads a file (pretrained,
  pretrained_cfg*, checkpoint_path, ...) and every number bounded.
- architectures the operator installs: an entry point in the group `negmerge.architectures`
  of an installed package (its name is the architecture's name, its value an `Architecture`),
  or `register_architecture` in a program that uses the library. An installed name takes
  precedence over timm's.

`init_args` are checked against the architecture's declared parameters before anything is
built; unknown keys are refused.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from negmerge.errors import NegMergeError

if TYPE_CHECKING:
    from torch import nn

ENTRY_POINT_GROUP = "negmerge.architectures"
_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")  # keys the error messages can name as init_args.<key>


class NoParameters(BaseModel):
    """An architecture that takes no keyword arguments."""

    model_config = ConfigDict(extra="forbid")


class TimmParameters(BaseModel):
    """The keyword arguments a timm model may be given (timm.create_model's model kwargs)."""

    model_config = ConfigDict(extra="forbid")

    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Stochastic depth rate.")
    in_chans: int = Field(3, ge=1, le=16, description="Input channels.")
    global_pool: Literal["avg", "max", "avgmax", "catavgmax", "token", "map"] = Field(
        "avg", description="Pooling before the classifier (the model's kinds vary)."
    )


@dataclass(frozen=True)
class Architecture:
    """An architecture the operator installs: `build(num_classes=n, **parameters)` makes the
    module (without weights); `parameters` declares the keyword arguments it takes (a
    pydantic model; unknown keys are refused whatever its own config says)."""

    build: Callable[..., nn.Module]
    parameters: type[BaseModel] = NoParameters
    description: str = ""

    def arguments(self, name: str, init_args: Mapping[str, Any]) -> dict[str, Any]:
        """`init_args` checked against the declared parameters: the values to build with.
        Raises NegMergeError naming the first key at fault."""
        allowed = sorted(self.parameters.model_fields)
        takes = f"{name} takes {', '.join(allowed)}" if allowed else f"{name} takes none"
        for key in init_args:
            if key not in self.parameters.model_fields:
                where = f"init_args.{key}" if _KEY.match(key) else "init_args"
                raise NegMergeError(f"{where}: {key!r} is not a parameter of {name} ({takes})")
        try:
            values = self.parameters.model_validate(dict(init_args))
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            raise NegMergeError(f"init_args.{key}: {error['msg']} ({takes})") from None
        return values.model_dump(include=set(init_args))


_registered: dict[str, Architecture] = {}


def register_architecture(name: str, architecture: Architecture) -> None:
    """Make `name` an architecture of this process (for programs that use the library; a
    service's operator installs an entry point instead, which every process finds)."""
    if not isinstance(architecture, Architecture):
        raise TypeError("register_architecture needs an Architecture")
    _registered[name] = architecture


@functools.cache
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def installed_names() -> list[str]:
    """The names of the architectures the operator installed."""
    return sorted({*_entry_points(), *_registered})


def _installed(name: str) -> Architecture | None:
    if name in _registered:
        return _registered[name]
    entry_point = _entry_points().get(name)
    if entry_point is None:
        return None
    architecture = entry_point.load()  # the operator's package: code the operator chose
    if not isinstance(architecture, Architecture):
        raise NegMergeError(
            f"architecture: the installed {name!r} ({entry_point.value}) is not an "
            "negmerge.models.architectures.Architecture"
        )
    return architecture


def classifier_architecture(name: str) -> Architecture:
    """The classifier architecture called `name`: one the operator installed, or timm's.
    Raises NegMergeError for anything else; nothing named is ever imported."""
    installed = _installed(name)
    if installed is not None:
        return installed
    _refuse_code_like(name)
    import timm

    if not timm.is_model(name):
        raise NegMergeError(f"architecture: timm knows no model {name!r}; {_known()}")
    return _timm_architecture(name)


def _timm_architecture(name: str) -> Architecture:
    return Architecture(
        build=functools.partial(_create_timm_model, name),
        parameters=TimmParameters,
        description=f"timm's {name}",
    )


def _refuse_code_like(name: str) -> None:
    if ":" in name or "/" in name:
        raise NegMergeError(
            f"architecture: {name!r} looks like an import path or file; an architecture is a "
            f"name: {_known()}"
        )


def _create_timm_model(name: str, num_classes: int, **parameters: Any) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **parameters)


def _known() -> str:
    installed = installed_names()
    listed = ", ".join(installed) if installed else "none on this server"
    return f"give a timm model name (timm.list_models()) or an installed architecture ({listed})"


def check_classifier(name: str, init_args: Mapping[str, Any], *, load: bool = True) -> None:
    """Raise NegMergeError unless `name` is a known classifier architecture and `init_args`
    fit its declared parameters.

    With `load=False` no model code is imported (the API process validates descriptions, and
    model code on its heap is walked by every later full garbage collection, in the middle
    of requests): a name must not look like code, and the init_args of a timm model (or of
    one registered in this process) must fit its parameters. That timm knows the name, and
    an entry point's own parameters, are then checked where the module is built
    (registration's weights check in a child process, the workers)."""
    if load:
        classifier_architecture(name).arguments(name, init_args)
        return
    if name in _registered:  # already in this process: nothing to import
        _registered[name].arguments(name, init_args)
        return
    if name in _entry_points():
        return
    _refuse_code_like(name)
    _timm_architecture(name).arguments(name, init_args)


__all__ = [
    "ENTRY_POINT_GROUP",
    "Architecture",
    "NoParameters",
    "TimmParameters",
    "check_classifier",
    "classifier_architecture",
    "installed_names",
    "register_architecture",
]
