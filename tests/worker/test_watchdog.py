"""The watchdog's repairs, one pass at a time, with no worker running."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.db.base import utcnow
from app.db.models import JobStep, StepState
from app.queue import JobQueue
from tests.worker.conftest import job_body, job_steps, submit
from worker.watchdog import run_once


@pytest.fixture
def queue(settings, redis_client):  # type: ignore[no-untyped-def]
    redis_client.delete(settings.queue_name)
    job_queue = JobQueue(settings)
    yield job_queue
    job_queue.close()
    redis_client.delete(settings.queue_name)


def queued(redis_client, settings) -> list[list]:  # type: ignore[no-untyped-def]
    """The (args, kwargs, options) of the messages waiting in the default queue."""
    raw = redis_client.lrange(settings.queue_name, 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"])) for m in raw]


def test_a_queued_job_whose_message_was_lost_is_sent_again(
    client, tenant, db, settings, redis_client, queue
):
    job_id = submit(client, tenant, job_body(tenant))
    redis_client.delete(settings.queue_name)  # the message never reached a worker
    assert run_once(db, queue, settings)["resent_first"] == 0  # too early
    eager = settings.model_copy(update={"resend_after_seconds": 0.001})
    assert run_once(db, queue, eager)["resent_first"] == 1
    assert [m[0] for m in queued(redis_client, settings)] == [[job_id, "prepare"]]
    assert job_steps(db, job_id)["prepare"].state is StepState.PENDING
    assert run_once(db, queue, settings)["resent"] == 0  # just sent: not again


def set_prepare(db, job_id: str, **values: object) -> None:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        session.execute(
            update(JobStep)
            .where(JobStep.job_id == uuid.UUID(job_id), JobStep.name == "prepare")
            .values(**values)
        )


def test_an_expired_lease_is_requeued_then_the_job_fails_after_the_last_attempt(
    client, tenant, db, settings, redis_client, queue
):
    job_id = submit(client, tenant, job_body(tenant))
    eager = settings.model_copy(update={"resend_after_seconds": 0.001})
    run_once(db, queue, eager)  # creates the prepare row
    redis_client.delete(settings.queue_name)
    expired = utcnow() - timedelta(seconds=1)
    dead = {"state": StepState.RUNNING, "lease_owner": "dead/0", "lease_expires_at": expired}

    set_prepare(db, job_id, attempts=1, **dead)  # a worker died in its first attempt
    assert run_once(db, queue, settings)["requeued"] == 1
    assert [m[0] for m in queued(redis_client, settings)] == [[job_id, "prepare"]]
    assert job_steps(db, job_id)["prepare"].state is StepState.PENDING

    set_prepare(db, job_id, attempts=settings.step_max_attempts, **dead)  # ... and its last
    assert run_once(db, queue, settings)["failed"] == 1
    job = client.get(f"/v1/unlearning-jobs/{job_id}", headers=tenant.headers).json()
    assert job["state"] == "FAILED"
    assert job["error"]["code"] == "step_attempts_exhausted"
    assert "prepare" in job["error"]["message"]
