"""Jobs for the dashboard to show. There are no workers in tests/app, so a finished job is
made by submitting it through the API and then driving it with the functions the workers
call (tests/app/jobs_driver.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.app.conftest import Registered
from tests.app.jobs_driver import METRICS_AFTER, METRICS_BEFORE, drive_to_success, submit

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
