"""/healthz, /readyz, /metrics, request ids and JSON logs."""

from __future__ import annotations

import json
import logging

from fastapi.testclient import TestClient

from app.main import create_app
from app.observability import JsonFormatter
from tests.app.conftest import job_body


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_is_503_when_the_broker_is_down(settings):
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["broker"].startswith("unreachable")


def test_metrics_count_requests_and_jobs_by_state(client, registered):
    client.post("/v1/unlearning-jobs", json=job_body(registered), headers=registered.caller.headers)
    text = client.get("/metrics").text
    assert 'negmerge_jobs{state="QUEUED"} 1.0' in text
    assert 'negmerge_jobs{state="RUNNING"} 0.0' in text
    assert (
        'negmerge_http_requests_total{method="POST",route="/v1/unlearning-jobs",status="202"}'
    ) in text
    assert "negmerge_job_stage_seconds" in text


def test_request_ids_are_returned_and_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="app.access"):
        given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        made = client.get("/healthz")
    assert given.headers["X-Request-ID"] == "abc-123"
    assert len(made.headers["X-Request-ID"]) == 32
    record = next(r for r in caplog.records if r.name == "app.access")
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "request" and line["route"] == "/healthz"
    assert line["status"] == 200 and "ms" in line


def test_errors_have_one_shape(client):
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Not Found", "fields": []}}
