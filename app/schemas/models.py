"""Models and their versions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import Strict

MODEL_EXAMPLE = {
    "name": "shapes-resnet",
    "description": "ResNet-18 trained on the shapes data set",
    "family": "classifier",
    "architecture": "resnet18",
    "classes": ["circle", "square", "triangle"],
    "weights_uri": "/srv/negmerge/models/shapes-resnet.safetensors",
    "image_size": 32,
}


class ModelCreate(Strict):
    """A base model to register; the server reads its weights and stores their sha256."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [MODEL_EXAMPLE]})

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = Field(None, max_length=2000)
    family: Literal["open_clip", "classifier"]
    architecture: str = Field(
        min_length=1,
        max_length=200,
        description="A name, never an import path: an open_clip model name (or the name of "
        "the custom config in model_config_uri), a timm model name, or an architecture the "
        "operator installed.",
    )
    classes: list[str] = Field(min_length=2, max_length=100_000)
    weights_uri: str = Field(
        min_length=1, max_length=4000, description="safetensors or PyTorch state-dict file."
    )
    templates: list[str] | None = Field(
        None, max_length=1000, description="open_clip: prompt templates, '{}' is the class name."
    )
    model_config_uri: str | None = Field(
        None,
        min_length=1,
        max_length=4000,
        description="open_clip: the JSON config of a custom architecture named `architecture` "
        "(a local file under the data roots).",
    )
    image_size: int | None = Field(None, gt=0, le=4096)
    init_args: dict[str, Any] = Field(
        default_factory=dict,
        description="classifier: keyword arguments among the architecture's declared "
        "parameters (timm: drop_rate, drop_path_rate, in_chans, global_pool); others are 422.",
    )


class ModelVersionOut(BaseModel):
    version: int = Field(examples=[2])
    weights_sha256: str = Field(
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    )
    size_bytes: int = Field(examples=[44_787_432])
    finetuning: Literal["standard", "linear"] = Field(
        "standard",
        description="linear: a linearized checkpoint (theta0 and the tangent delta, in "
        "safetensors with metadata finetuning=linear); serve it with "
        "negmerge.models.load_linearized, whose forward is the tangent model.",
    )
    parent_version: int | None = Field(None, description="The version this one was made from.")
    produced_by_job_id: uuid.UUID | None = Field(None, description="The job that made it.")
    deletion_requests: list[uuid.UUID] = Field(
        default_factory=list, description="The deletion requests this version carries."
    )
    created_at: datetime
    download_url: str = Field(
        examples=["/v1/models/3fa85f64-5717-4562-b3fc-2c963f66afa6/versions/2/weights"]
    )
    status: Literal["available", "superseded", "kept", "deleted"] = Field(
        "available",
        description="superseded: a job unlearned from it and it still holds that job's "
        "forget data, so it is neither downloaded (410) nor a job's base (422), unless the "
        "tenant's retention policy keeps superseded versions; kept: superseded, but an admin "
        "keeps it usable (kept_reason); deleted: a tombstone, its bytes are gone.",
    )
    usable: bool = Field(True, description="Whether it downloads and can be a job's base.")
    superseded_at: datetime | None = None
    kept_at: datetime | None = None
    kept_by: str | None = None
    kept_reason: str | None = None
    deleted_at: datetime | None = None
    deleted_by: str | None = None
    deletion_reason: str | None = None


class ModelOut(BaseModel):
    id: uuid.UUID
    name: str = Field(examples=["shapes-resnet"])
    description: str | None = None
    family: Literal["open_clip", "classifier"]
    architecture: str = Field(examples=["resnet18"])
    classes: list[str] = Field(examples=[["circle", "square", "triangle"]])
    templates: list[str] | None = None
    model_config_uri: str | None = None
    image_size: int | None = None
    latest_version: int = Field(examples=[1])
    created_at: datetime
    updated_at: datetime
