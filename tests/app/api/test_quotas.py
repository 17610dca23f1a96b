"""Per-tenant quotas: jobs that have not ended and worker seconds per day are 429s with
Retry-After; stored bytes are 413s. Each names its limit; overrides apply per tenant."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app.db.base import utcnow
from app.db.models import Dataset, JobStep, StepState, UnlearningJob
from app.db.usage_repositories import StepSpan
from app.main import create_app
from app.services.quotas import compute_seconds, seconds_until_below
from app.settings import TenantQuota
from tests.app.conftest import CLASSES, job_body

JOBS = "/v1/unlearning-jobs"


@pytest.fixture
def quota_app(settings, db) -> Iterator[Callable[..., TestClient]]:  # type: ignore[no-untyped-def]
    """quota_app(**settings) is a second app on the same database with those quotas."""
    made = []

    def make(**changes: object) -> TestClient:
        application = create_app(settings.model_copy(update=changes))
        client = TestClient(application, raise_server_exceptions=False)
        client.__enter__()
        made.append((application, client))
        return client

    yield make
    for application, client in made:
        client.__exit__(None, None, None)
        application.state.db.dispose()


def submit(client: TestClient, registered, **changes):  # type: ignore[no-untyped-def]
    return client.post(
        JOBS, json=job_body(registered, **changes), headers=registered.caller.headers
    )


def test_active_jobs_past_the_quota_are_429_until_one_ends(
    quota_app, registered, register, make_caller
):
    client = quota_app(quota_active_jobs=2)
    first, second = (submit(client, registered) for _ in range(2))
    assert first.status_code == second.status_code == 202
    third = submit(client, registered)
    assert third.status_code == 429, third.text
    assert third.headers["Retry-After"] == "5"
    error = third.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "2 jobs that have not ended" in error["message"]
    assert "NEGMERGE_QUOTA_ACTIVE_JOBS" in error["message"]
    # Another tenant has its own count.
    other = register(make_caller("globex"))
    assert submit(client, other).status_code == 202
    # A job that ends makes room.
    cancel = client.post(f"{JOBS}/{first.json()['id']}:cancel", headers=registered.caller.headers)
    assert cancel.json()["state"] == "CANCELLED"
    assert submit(client, registered).status_code == 202


def test_concurrent_submissions_cannot_pass_the_quota_together(quota_app, registered, db):
    client = quota_app(quota_active_jobs=3)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(
                    http.post(JOBS, json=job_body(registered), headers=registered.caller.headers)
                    for _ in range(10)
                )
            )

    codes = sorted(response.status_code for response in asyncio.run(burst()))
    assert codes == [202] * 3 + [429] * 7
    with db.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(UnlearningJob)) == 3


def test_a_tenants_override_replaces_the_global_quota(quota_app, registered, register, make_caller):
    other = register(make_caller("globex"))
    client = quota_app(
        quota_active_jobs=1,
        quota_overrides={"acme": TenantQuota(active_jobs=3)},
    )
    assert [submit(client, registered).status_code for _ in range(4)] == [202, 202, 202, 429]
    assert [submit(client, other).status_code for _ in range(2)] == [202, 429]


def add_step(db, job_id: str, name: str, started_ago: float, seconds: float | None) -> None:  # type: ignore[no-untyped-def]
    """A step row as a worker leaves it: finished after `seconds`, or (None) still running."""
    now = utcnow()
    with db.unit_of_work() as session:
        job = session.get(UnlearningJob, uuid.UUID(job_id))
        started = now - timedelta(seconds=started_ago)
        session.add(
            JobStep(
                job_id=job.id,
                tenant_id=job.tenant_id,
                name=name,
                state=StepState.DONE if seconds is not None else StepState.RUNNING,
                attempts=1,
                started_at=started,
                finished_at=started + timedelta(seconds=seconds) if seconds is not None else None,
                lease_expires_at=None if seconds is not None else now + timedelta(seconds=60),
                lease_owner=None if seconds is not None else "worker-1",
            )
        )


def test_compute_over_the_last_day_is_429_with_retry_after(quota_app, registered, db):
    client = quota_app(quota_compute_seconds_per_day=3600.0)
    job = submit(client, registered).json()["id"]
    add_step(db, job, "prepare", started_ago=30 * 3600, seconds=3 * 3600)  # left the window
    assert submit(client, registered).status_code == 202
    add_step(db, job, "finetune:0", started_ago=10 * 3600, seconds=2 * 3600)  # ended 8 h ago
    refused = submit(client, registered)
    assert refused.status_code == 429, refused.text
    message = refused.json()["error"]["message"]
    assert "used 7200 worker seconds in the last 24 hours" in message
    assert "quota is 3600" in message and "NEGMERGE_QUOTA_COMPUTE_SECONDS_PER_DAY" in message
    # Room comes back when that step's end leaves the window: in 16 hours.
    assert abs(int(refused.headers["Retry-After"]) - 16 * 3600) <= 5


def test_a_running_step_counts_up_to_now(quota_app, registered, db):
    client = quota_app(quota_compute_seconds_per_day=3600.0)
    job = submit(client, registered).json()["id"]
    add_step(db, job, "finetune:0", started_ago=3000, seconds=None)
    assert submit(client, registered).status_code == 202  # 3000 s so far
    add_step(db, job, "finetune:1", started_ago=700, seconds=None)
    assert submit(client, registered).status_code == 429  # 3700 s


def test_compute_seconds_clip_to_the_window():
    now = utcnow()
    hour = timedelta(hours=1)
    spans = [
        StepSpan(now - 25 * hour, now - 23 * hour, None),  # 1 h inside
        StepSpan(now - 2 * hour, now - hour, None),
        StepSpan(now - hour / 2, None, now + hour),  # running: half an hour so far
    ]
    assert compute_seconds(spans, now) == pytest.approx(2.5 * 3600)
    # Under 2.6 h once the first has left (in 1 h): 1 h, and the running one up to its lease.
    assert seconds_until_below(spans, now, 2.6 * 3600) == 3600


def test_a_job_whose_new_version_would_pass_the_storage_quota_is_413(
    quota_app, registered, weights_file
):
    size = weights_file.stat().st_size
    client = quota_app(quota_stored_bytes=size - 1)
    response = submit(client, registered)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "storage_quota_exceeded"
    assert f"needs {size} more" in error["message"] and f"quota is {size - 1}" in error["message"]
    assert submit(quota_app(quota_stored_bytes=size), registered).status_code == 202


def archive() -> tuple[bytes, int]:
    """A small data set as a zip, and the bytes its files take unpacked."""
    files = {}
    rows = []
    for i in range(3):
        image = io.BytesIO()
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(image, format="PNG")
        files[f"img/{i}.png"] = image.getvalue()
        rows.append({"id": f"s{i}", "path": f"img/{i}.png", "label": CLASSES[i]})
    files["manifest.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue(), sum(len(data) for data in files.values())


def upload(client: TestClient, caller, data: bytes):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/datasets:upload",
        files={"file": ("data.zip", data, "application/zip")},
        data={"name": "uploaded"},
        headers=caller.headers,
    )


def test_uploads_count_against_the_storage_quota(quota_app, caller, db, settings):
    data, unpacked = archive()
    client = quota_app(quota_stored_bytes=unpacked)
    stored = upload(client, caller, data)
    assert stored.status_code == 201, stored.text
    with db.unit_of_work() as session:
        assert session.get(Dataset, uuid.UUID(stored.json()["id"])).stored_bytes == unpacked
    refused = upload(client, caller, data)
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert error["code"] == "storage_quota_exceeded"
    assert f"stores {unpacked} bytes and this upload needs {unpacked} more" in error["message"]
    # Nothing of the refused upload stays: one data set, one folder.
    with db.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 1
    folders = Path(settings.artifact_root, "datasets", str(caller.tenant_id))
    assert len(list(folders.iterdir())) == 1


def test_retries_with_one_idempotency_key_are_answered_not_counted(quota_app, registered, db):
    """Concurrent retries of one request: one job, every answer that job, even with a quota
    of one active job that the first of them fills."""
    client = quota_app(quota_active_jobs=1)
    headers = {**registered.caller.headers, "Idempotency-Key": "retry-me"}

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(http.post(JOBS, json=job_body(registered), headers=headers) for _ in range(8))
            )

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    with db.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(UnlearningJob)) == 1
