"""Data sets."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import Strict


class DatasetCreate(Strict):
    """A data set to register from a manifest the server can read."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "shapes",
                    "manifest_uri": "/srv/negmerge/data/shapes/manifest.jsonl",
                    "model_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
                }
            ]
        },
    )

    name: str = Field(min_length=1, max_length=200)
    manifest_uri: str = Field(
        min_length=1,
        max_length=4000,
        description="manifest.jsonl / .csv (id, path, label, split), or a folder holding one, "
        "or an ImageFolder tree.",
    )
    root_uri: str | None = Field(
        None, max_length=4000, description="Root of the image paths (default: the manifest's)."
    )
    model_id: uuid.UUID | None = Field(
        None, description="If given, every label must be one of this model's classes."
    )


class DatasetOut(BaseModel):
    id: uuid.UUID
    name: str = Field(examples=["shapes"])
    source: Literal["uri", "upload"]
    manifest_uri: str | None = Field(None, description="Where it was registered from (uri only).")
    manifest_sha256: str = Field(description="sha256 over the ids, paths, labels and splits.")
    content_sha256: str = Field(description="sha256 over the manifest and every image's bytes.")
    archive_sha256: str | None = Field(None, description="sha256 of the uploaded archive.")
    sample_count: int = Field(examples=[1500])
    labels: list[str] = Field(examples=[["circle", "square", "triangle"]])
    split_counts: dict[str, int] = Field(examples=[{"train": 1050, "val": 150, "test": 300}])
    created_at: datetime
    deleted_at: datetime | None = Field(
        None,
        description="A tombstone: when its stored files were deleted (the row stays, with its "
        "hashes, because jobs and reports name it).",
    )
    deleted_by: str | None = None
    deletion_reason: str | None = None
