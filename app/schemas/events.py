"""The data of a job's Server-Sent Events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.db.models import JobStage, JobState
from app.schemas.jobs import JobProgress


class JobStreamEvent(BaseModel):
    """One change of a job, as the `data:` line of an SSE message (JSON on one line)."""

    id: int = Field(description="The event id, also the message's SSE id.", examples=[7])
    job_id: uuid.UUID
    kind: str = Field(description="state, stage or progress (also the SSE event name).")
    state: JobState = Field(description="The job's state at the event.")
    stage: JobStage | None = Field(None, description="The job's stage at the event.")
    at: datetime
    details: dict[str, Any] = Field(
        default_factory=dict,
        description='state: {"from", "to", "error_code"?, "verdict"?: {"met", "reason"} '
        '(the end of a job that ran to the end)}; progress: {"variants_done", '
        '"variants_total"} or {"lambda", "lambdas_evaluated"}.',
    )
    progress: JobProgress = Field(description="The job's progress when the message was sent.")
