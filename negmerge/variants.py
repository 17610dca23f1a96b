"""The n fine-tuning runs of a job: a declarative grid of hyperparameters, or a preset.

A grid is a base (values every variant shares) and lists of values whose cartesian product
gives the variants, e.g. {"preset": "clip-paper"} or
{"base": {"lr": 1e-5, "epochs": 2}, "grid": {"augment": ["rand-m1-n1", "rand-m5-n2"]}}.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_VARIANTS = 1024  # checked before expanding, so a huge grid is refused, not enumerated
_AUGMENT = re.compile(r"^rand(-[a-z]+[0-9.]*)+$")


class Variant(BaseModel):
    """The hyperparameters of one fine-tuning run on the forget set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only.")
    epochs: int | None = Field(1, gt=0, description="Passes over the forget set (or give steps).")
    steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, then cosine decay.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: str | None = Field(
        None, description="timm RandAugment config, rand-m{M}-n{N}.", examples=["rand-m9-n2"]
    )
    batch_size: int = Field(32, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; null: none.")
    seed: int | None = Field(
        None,
        description="Training seed. Default: derived from the job's seed and the variant's "
        "index, so every variant draws its own data order and augmentations.",
    )

    @field_validator("augment")
    @classmethod
    def _augment(cls, value: str | None) -> str | None:
        if value is not None and not _AUGMENT.match(value):
            raise ValueError(f"{value!r} is not a RandAugment config like 'rand-m9-n2'")
        return value

    def key(self) -> str:
        """A short content key: the same hyperparameters always give the same key."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def label(self) -> str:
        parts = [f"{self.optimizer} lr={self.lr:g}", f"wd={self.weight_decay:g}"]
        parts.append(f"steps={self.steps}" if self.steps else f"epochs={self.epochs}")
        if self.label_smoothing:
            parts.append(f"ls={self.label_smoothing:g}")
        if self.augment:
            parts.append(self.augment)
        return " ".join(parts)


def variant_seed(job_seed: int, index: int) -> int:
    """The default seed of variant `index` of a job: distinct per variant, the same on a rerun.

    A hash rather than job_seed + index, so that neighbouring job seeds do not share variants'
    seeds (job 0's variant 1 would otherwise train exactly as job 1's variant 0).
    """
    digest = hashlib.sha256(f"negmerge.variant-seed:{job_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


PRESETS: dict[str, dict] = {
    # The paper's CLIP grid: RandAugment M = 1..10 x N = 1..3, AdamW, head frozen.
    "clip-paper": {
        "base": {
            "optimizer": "adamw",
            "lr": 1e-5,
            "weight_decay": 0.1,
            "warmup_steps": 200,
            "grad_clip": 1.0,
            "epochs": 10,
            "batch_size": 128,
        },
        "grid": {"augment": [f"rand-m{m}-n{n}" for m in range(1, 11) for n in range(1, 4)]},
    },
    # A classifier grid: epochs x weight decay x label smoothing, SGD (27 variants).
    "classifier-paper": {
        "base": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 128},
        "grid": {
            "epochs": [5, 10, 20],
            "weight_decay": [1e-4, 5e-4, 1e-3],
            "label_smoothing": [0.0, 0.1, 0.2],
        },
    },
    # Small grids for the offline fixtures: tests and the demo.
    "tiny-clip": {
        "base": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1, "steps": 30},
        "grid": {"augment": ["rand-m1-n1", "rand-m5-n2", "rand-m9-n3"]},
    },
    "tiny-classifier": {
        "base": {"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 2},
        "grid": {"weight_decay": [1e-4, 1e-3], "label_smoothing": [0.0, 0.1]},
    },
}


class VariantGrid(BaseModel):
    """A preset, and/or a base with lists of values to combine."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(None, description=f"One of: {', '.join(PRESETS)}.")
    base: dict[str, object] = Field(default_factory=dict)
    grid: dict[str, list] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> VariantGrid:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; choose one of {', '.join(PRESETS)}")
        fields = set(Variant.model_fields)
        for name in [*self.base, *self.grid]:
            if name not in fields:
                raise ValueError(f"{name!r} is not a hyperparameter; use one of {sorted(fields)}")
        for name, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{name}: give at least one value")
        count = math.prod(
            len(v)
            for v in {**PRESETS.get(self.preset or "", {}).get("grid", {}), **self.grid}.values()
        )
        if count > MAX_VARIANTS:
            raise ValueError(f"grid: {count} combinations; at most {MAX_VARIANTS}")
        self.expand()  # every combination must be a valid variant
        return self

    def expand(self) -> list[Variant]:
        """Every variant, in a stable order."""
        preset = PRESETS.get(self.preset or "", {})
        base = {**preset.get("base", {}), **self.base}
        grid = {**preset.get("grid", {}), **self.grid}
        names = list(grid)
        return [
            Variant(**{**base, **dict(zip(names, values, strict=True))})
            for values in itertools.product(*(grid[name] for name in names))
        ]
