"""The audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class AuditEntryOut(BaseModel):
    seq: int = Field(description="Position in the tenant's chain, from 1.", examples=[42])
    at: datetime
    actor: str = Field(examples=["api_key:0b6f6a2e-1f0e-4f55-9d4f-2c9b8d7e6a51"])
    action: str = Field(examples=["job.created"])
    resource_type: str = Field(examples=["unlearning_job"])
    resource_id: str | None = None
    details: dict[str, Any] = Field(examples=[{"request_id": "5d0c0a1f9e8b4c7d"}])
    prev_hash: str = Field(description="The previous entry's hash (64 zeros for the first).")
    hash: str = Field(description="sha256 of this entry's canonical content.")
