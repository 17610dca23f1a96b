"""Jobs for the dashboard to show. There are no workers in tests/app, so a finished job is
made by submitting it through the API and then driving it with the functions the workers
call (tests/app/jobs_driver.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.artifacts import store_for
from tests.app.api.test_retention import uploaded
from tests.app.conftest import Registered
from tests.app.jobs_driver import (
    MET_TARGET,
    METRICS_AFTER,
    METRICS_BEFORE,
    drive_to_success,
    submit,
)
from worker.retention import apply_due

__all__ = ["METRICS_AFTER", "METRICS_BEFORE", "drive_to_success", "submit"]


def sign_in(client: TestClient, key: str) -> None:
    """Sign in through the form (the test client keeps the cookie)."""
    response = client.post("/dashboard/sign-in", data={"api_key": key}, follow_redirects=False)
    assert response.status_code == 303, response.text


@pytest.fixture
def finished_job(app: FastAPI, client: TestClient, registered: Registered) -> Callable[..., Any]:
    """finished_job(**changes) -> (job id, result): a SUCCEEDED job of the registered model."""

    def make(**changes: object) -> tuple[str, dict[str, Any]]:
        job_id = submit(client, registered, **changes)
        return job_id, drive_to_success(app, job_id)

    return make


@dataclass(frozen=True)
class CarriedRequests:
    job_id: str
    forgotten: dict[str, Any]  # the batched requests, by subject reference, as the API gave them
    pending: dict[str, Any]  # one received after the batch: no job yet, and overdue


@pytest.fixture
def carried_requests(app, client, db, registered, settings, tmp_path) -> CarriedRequests:  # type: ignore[no-untyped-def]
    """Two subjects' requests on an uploaded data set, batched into one job that met its
    target and whose retention has run (the forgotten images deleted), and a third request
    still pending: all through the API, the job driver and the worker's retention."""
    headers = registered.caller.headers
    data = uploaded(client, registered, name="faces")
    policy = {"mode": "manual", "job": {"variants": {"preset": "tiny-classifier"},
                                        "target": MET_TARGET}}  # fmt: skip
    put = client.put(f"/v1/models/{registered.model_id}/deletion-policy", json=policy,
                     headers=headers)  # fmt: skip
    assert put.status_code == 200, put.text

    def send(subject: str, ids: list[str], **changes: object) -> dict[str, Any]:
        body = {"model_id": registered.model_id, "dataset_id": data["id"], "ids": ids,
                "subject_reference": subject, "legal_basis": "GDPR Art. 17", **changes}  # fmt: skip
        response = client.post("/v1/deletion-requests", json=body, headers=headers)
        assert response.status_code == 201, response.text
        return response.json()

    send("DSR-ALICE", ["u0", "u1"])
    send("DSR-BOB", ["u2"])
    made = client.post(f"/v1/models/{registered.model_id}/deletion-requests:batch",
                       headers=headers)  # fmt: skip
    assert made.status_code == 202, made.text
    job_id = made.json()["job_id"]
    drive_to_success(app, job_id)
    scratch = settings.model_copy(update={"scratch_root": str(tmp_path / "scratch")})
    assert apply_due(db, store_for(scratch), scratch) == {"retention_done": 1}
    pending = send("DSR-CAROL", ["u3"], received_at="2026-01-05T09:00:00Z")
    listed = client.get(f"/v1/deletion-requests?job_id={job_id}", headers=headers).json()
    return CarriedRequests(job_id, {r["subject_reference"]: r for r in listed["items"]}, pending)
