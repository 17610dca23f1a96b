"""The OpenAPI document names every answer a route can give (400 and 415 where a body is
read, 503 where the database is) and types the event stream; /metrics is the operator's to
open, close or trim."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from app.settings import Settings


@pytest.fixture(scope="module")
def document(app) -> dict:  # type: ignore[no-untyped-def]
    return app.openapi()


def operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_body_routes_document_400_and_json_ones_415(document):
    with_body = [(p, m, o) for p, m, o in operations(document) if "requestBody" in o]
    assert len(with_body) >= 5
    for path, method, operation in with_body:
        responses = operation["responses"]
        assert "400" in responses, (method, path)
        is_json = "application/json" in operation["requestBody"]["content"]
        assert ("415" in responses) == is_json, (method, path)
        ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorResponse"


def test_every_route_on_the_database_documents_503(document):
    for path, method, operation in operations(document):
        if path.startswith("/v1/"):
            assert "503" in operation["responses"], (method, path)


def test_the_event_stream_is_typed_as_server_sent_events(document):
    responses = document["paths"]["/v1/unlearning-jobs/{job_id}/events"]["get"]["responses"]
    content = responses["200"]["content"]
    assert list(content) == ["text/event-stream"]
    stream = content["text/event-stream"]
    assert stream["schema"]["contentMediaType"] == "text/event-stream"
    message = stream["itemSchema"]["properties"]
    assert message["event"]["enum"] == ["state", "stage", "progress"]
    data = message["data"]
    assert data["contentMediaType"] == "application/json"
    assert {"id", "job_id", "state", "progress"} <= set(data["contentSchema"]["properties"])
    assert data["contentSchema"]["properties"]["state"]["$ref"] in {
        f"#/components/schemas/{name}" for name in document["components"]["schemas"]
    }
    # Errors of the stream's route are JSON, as they are sent.
    assert list(responses["404"]["content"]) == ["application/json"]


def test_the_documented_400_and_415_are_what_is_sent(client, caller):
    not_utf8 = client.post(
        "/v1/webhook-endpoints",
        content=b'{"url": "\xff"}',
        headers={**caller.headers, "Content-Type": "application/json"},
    )
    assert not_utf8.status_code == 400, not_utf8.text
    assert not_utf8.json()["error"]["code"] == "bad_request"
    as_text = client.post(
        "/v1/webhook-endpoints",
        content=b'{"url": "https://example.com/"}',
        headers={**caller.headers, "Content-Type": "text/plain"},
    )
    assert as_text.status_code == 415, as_text.text


@pytest.fixture
def metrics_client(request, settings: Settings, db) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    application = create_app(settings.model_copy(update=request.param))
    with TestClient(application, raise_server_exceptions=False) as test_client:
        yield test_client
    application.state.db.dispose()


@pytest.mark.parametrize("metrics_client", [{}], indirect=True)
def test_metrics_show_job_counts_by_default(metrics_client):
    response = metrics_client.get("/metrics")
    assert response.status_code == 200 and 'negmerge_jobs{state="QUEUED"}' in response.text


@pytest.mark.parametrize("metrics_client", [{"metrics_job_counts": False}], indirect=True)
def test_metrics_job_counts_can_be_hidden(metrics_client):
    response = metrics_client.get("/metrics")
    assert response.status_code == 200
    assert "negmerge_jobs" not in response.text and "negmerge_http_requests_total" in response.text


@pytest.mark.parametrize(
    "metrics_client", [{"metrics_token": SecretStr("s3cret-scrape")}], indirect=True
)
def test_metrics_can_require_a_token(metrics_client):
    assert metrics_client.get("/metrics").status_code == 401
    wrong = metrics_client.get("/metrics", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthenticated"
    right = metrics_client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"})
    assert right.status_code == 200 and "negmerge_jobs" in right.text
