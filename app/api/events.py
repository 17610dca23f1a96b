"""GET /v1/unlearning-jobs/{job_id}/events: a job's changes as Server-Sent Events.

The feed is the job_events table (the report's timeline); each row is one message and its id
is the message's SSE id. The stream looks for new rows every events_poll_seconds, each look a
short transaction in a worker thread (the event loop never waits on the database, and no
connection is held between looks), sends a comment after events_heartbeat_seconds without a
message so that proxies keep the connection, and ends once the job's terminal state event is
sent. A client that reconnects sends Last-Event-ID (EventSource does) and gets only the
events after it.

A job's events are written under its row lock, so their ids grow in commit order: a cursor
(`id > last`) never skips an event that commits later with a smaller id.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.api.common import AUTH_ERRORS, SettingsDep, errors
from app.auth import JOB_READERS, Principal, require
from app.db.event_repositories import JobEventRepository
from app.db.repositories import JobRepository
from app.db.session import Database
from app.dependencies import DbSession
from app.schemas.events import JobStreamEvent
from app.schemas.jobs import JobProgress
from app.services import job_states
from app.settings import Settings

router = APIRouter(prefix="/v1/unlearning-jobs", tags=["unlearning jobs"])

Reader = Annotated[Principal, Depends(require(*JOB_READERS))]

BATCH = 500  # events read per look; a longer backlog is sent in several looks, at once
RETRY_MS = 3000  # how long EventSource waits before it reconnects
MAX_EVENT_ID = 2**63 - 1  # a BIGINT; larger numbers cannot be a cursor

EXAMPLE = (
    "retry: 3000\n\n"
    "id: 41\nevent: stage\n"
    'data: {"id":41,"job_id":"…","kind":"stage","state":"RUNNING","stage":"finetuning",'
    '"at":"2026-01-05T10:00:03Z","details":{},"progress":{"variants_done":0,'
    '"variants_total":4,"lambdas_evaluated":0,"percent":10.0}}\n\n'
    ": keep-alive\n\n"
)


def _event_data_schema() -> dict[str, Any]:
    # Its parts (JobState, JobStage, JobProgress) are components already: jobs use them.
    schema = JobStreamEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


# The stream as a whole is text; each message is typed with OpenAPI 3.2's itemSchema (for
# sequential media types such as text/event-stream): its fields, and its data as JSON.
EVENT_STREAM: dict[str, Any] = {
    "schema": {
        "type": "string",
        "format": "event-stream",
        "contentMediaType": "text/event-stream",
        "description": "Server-Sent Events (text/event-stream); each message is itemSchema.",
    },
    "itemSchema": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "The event id: send it as Last-Event-ID."},
            "event": {"type": "string", "enum": ["state", "stage", "progress"]},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": _event_data_schema(),
            },
            "retry": {"type": "integer", "description": "Milliseconds before reconnecting."},
        },
    },
    "example": EXAMPLE,
}


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def json_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """errors(...), documented as JSON: FastAPI would give a "model" response this route's
    media type, text/event-stream. (ErrorResponse is in the components: every route uses it.)"""
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        code: {
            "description": spec["description"],
            "content": {"application/json": {"schema": schema}},
        }
        for code, spec in errors(*codes).items()
    }


@dataclass(frozen=True)
class Message:
    id: int
    text: bytes
    terminal: bool


@dataclass(frozen=True)
class EventBatch:
    messages: list[Message]
    job_ended: bool
    more: bool  # the batch was full: read again at once


def sse_message(event_id: int, event: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n".encode()


def read_events(
    db: Database, tenant_id: uuid.UUID, job_id: uuid.UUID, after: int
) -> EventBatch | None:
    """The job's events after `after`, as messages; None if the job is gone."""
    with db.unit_of_work() as session:
        # The events first, then the job: each statement sees what had committed when it ran,
        # so the progress read second is never older than the events it is sent with. A job
        # that ended in between committed its terminal event with its state: read on to it.
        events = JobEventRepository(session, tenant_id)
        rows = events.after(job_id, after, BATCH)
        job = JobRepository(session, tenant_id).get(job_id)
        if job is None:
            return None
        if job.state.is_terminal and len(rows) < BATCH:
            rows += events.after(job_id, rows[-1].id if rows else after, BATCH - len(rows))
        progress = JobProgress.of(job)
        messages = []
        for row in rows:
            data = JobStreamEvent(
                id=row.id,
                job_id=row.job_id,
                kind=row.kind,
                state=row.state,
                stage=row.stage,
                at=row.at,
                details=row.details or {},
                progress=progress,
            )
            terminal = row.kind == "state" and row.state.is_terminal
            messages.append(
                Message(row.id, sse_message(row.id, row.kind, data.model_dump_json()), terminal)
            )
        return EventBatch(messages, job.state.is_terminal, len(rows) == BATCH)


async def event_stream(
    db: Database, tenant_id: uuid.UUID, job_id: uuid.UUID, after: int, settings: Settings
) -> AsyncIterator[bytes]:
    """The stream's bytes, until the terminal event, the job's disappearance or
    events_max_stream_seconds (the client then reconnects with Last-Event-ID)."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    started = last_sent = time.monotonic()
    while True:
        found = await anyio.to_thread.run_sync(read_events, db, tenant_id, job_id, after)
        if found is None:
            return
        for message in found.messages:
            yield message.text
            after = message.id
            if message.terminal:
                return
        now = time.monotonic()
        if found.messages:
            last_sent = now
        if found.more:
            continue
        if found.job_ended or now - started >= settings.events_max_stream_seconds:
            return  # ended: its terminal event was at or before the client's cursor
        if now - last_sent >= settings.events_heartbeat_seconds:
            yield b": keep-alive\n\n"
            last_sent = now
        await anyio.sleep(settings.events_poll_seconds)


@router.get(
    "/{job_id}/events",
    response_class=EventStreamResponse,
    responses={
        200: {
            "description": "A text/event-stream of the job's events, oldest first. Each "
            "message has `id` (the event id), `event` (state, stage or progress) and `data`, "
            "one line of JSON: {id, job_id, kind, state, stage, at, details, progress} "
            "(progress: the job's progress when the message was sent). Lines starting with "
            "':' are heartbeats. The stream ends after the job's terminal state "
            "(SUCCEEDED, FAILED or CANCELLED), and at once for an ended job with nothing "
            "after the client's cursor.",
            "content": {"text/event-stream": EVENT_STREAM},
        },
        **json_errors(*AUTH_ERRORS, 404, 422),
    },
    summary="Follow a job's state, stage and progress (Server-Sent Events)",
)
def stream_job_events(
    job_id: uuid.UUID,
    principal: Reader,
    session: DbSession,
    settings: SettingsDep,
    request: Request,
    last_event_id: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_EVENT_ID,
            description="Send only events after this id, for clients that cannot set the "
            "Last-Event-ID header. The header wins when both are given.",
        ),
    ] = None,
    last_event_id_header: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=MAX_EVENT_ID,
            description="The id of the last event received: only later events are sent "
            "(EventSource sends it when it reconnects).",
        ),
    ] = None,
) -> EventStreamResponse:
    """Streams every event of the job from the start (or after Last-Event-ID), then new ones
    as they happen, and ends when the job has ended. Unlike polling GET, it misses no step."""
    job = job_states.get_job(session, principal.tenant_id, job_id)  # another tenant's: 404
    after = last_event_id_header if last_event_id_header is not None else last_event_id or 0
    stream = event_stream(request.app.state.db, principal.tenant_id, job.id, after, settings)
    return EventStreamResponse(
        stream,
        # no-cache and no proxy buffering: each message must reach the client when it is sent.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
