"""Tenant isolation, endpoint by endpoint: another tenant's resources answer 404, are absent
from lists, and cannot be named in a request."""

from __future__ import annotations

from tests.app.api.test_datasets import good_files, upload, zip_of
from tests.app.conftest import job_body


def test_every_endpoint_hides_other_tenants(client, app, register, make_caller):
    a = register(make_caller("tenant-a"))
    b = make_caller("tenant-b")
    job = client.post("/v1/unlearning-jobs", json=job_body(a), headers=a.caller.headers).json()
    m, d, j = a.model_id, a.dataset_id, job["id"]
    request = {"model_id": m, "dataset_id": d, "ids": ["circle-5"], "subject_reference": "DSR-9"}
    created = client.post("/v1/deletion-requests", json=request, headers=a.caller.headers)
    assert created.status_code == 201, created.text
    r = created.json()["id"]

    # Every path with an id, read by tenant B: 404.
    not_found = [
        ("get", f"/v1/models/{m}"),
        ("get", f"/v1/models/{m}/versions"),
        ("get", f"/v1/models/{m}/versions/1"),
        ("get", f"/v1/models/{m}/versions/1/weights"),
        ("get", f"/v1/datasets/{d}"),
        ("get", f"/v1/unlearning-jobs/{j}"),
        ("get", f"/v1/unlearning-jobs/{j}/report"),
        ("post", f"/v1/unlearning-jobs/{j}:cancel"),
        ("get", f"/v1/unlearning-jobs/{j}/events"),
        ("get", f"/v1/unlearning-jobs/{j}/webhook-deliveries"),
        ("get", f"/v1/deletion-requests/{r}"),
        ("post", f"/v1/deletion-requests/{r}:cancel"),
        ("get", f"/v1/models/{m}/deletion-policy"),
        ("post", f"/v1/models/{m}/deletion-requests:batch"),
    ]
    for method, path in not_found:
        response = getattr(client, method)(path, headers=b.headers)
        assert response.status_code == 404, (path, response.text)

    # Every list, read by tenant B: none of A's items.
    lists = (
        "/v1/models",
        "/v1/datasets",
        "/v1/unlearning-jobs",
        "/v1/audit",
        "/v1/deletion-requests",
    )
    for path in lists:
        items = client.get(path, headers=b.headers).json()["items"]
        assert all(str(item.get("id", "")) not in {m, d, j, r} for item in items), path
        assert all(item.get("resource_id") not in {m, d, j, r} for item in items), path
    assert client.get("/v1/unlearning-jobs", headers=b.headers).json()["items"] == []
    assert client.get("/v1/audit", headers=b.headers).json()["items"][0]["action"] == (
        "api_key.created"
    )

    # Every create naming A's resources, by tenant B: refused, naming the field.
    submit = client.post("/v1/unlearning-jobs", json=job_body(a), headers=b.headers)
    assert submit.status_code == 422 and submit.json()["error"]["fields"][0]["field"] == "model.id"
    dataset = client.post(
        "/v1/datasets",
        json={"name": "x", "manifest_uri": "/nowhere", "model_id": m},
        headers=b.headers,
    )
    assert dataset.status_code == 422
    assert dataset.json()["error"]["fields"][0]["field"] == "model_id"
    uploaded = upload(client, b, zip_of(good_files()), model_id=m)
    assert uploaded.status_code == 422
    assert uploaded.json()["error"]["fields"][0]["field"] == "model_id"

    policy = {"mode": "manual", "job": {"variants": {"preset": "tiny-classifier"}}}
    put = client.put(f"/v1/models/{m}/deletion-policy", json=policy, headers=b.headers)
    assert put.status_code == 404, put.text
    named = client.post("/v1/deletion-requests", json=request, headers=b.headers)
    assert named.status_code == 422 and named.json()["error"]["fields"][0]["field"] == "model_id"

    # A's job and request were not touched by B's cancels.
    assert client.get(f"/v1/deletion-requests/{r}", headers=a.caller.headers).json()["state"] == (
        "PENDING"
    )
    assert client.get(f"/v1/unlearning-jobs/{j}", headers=a.caller.headers).json()["state"] == (
        "QUEUED"
    )

    # Every /v1 route is covered above (a new route must be added here).
    covered = {
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/models/{model_id}/versions",
        "/v1/models/{model_id}/versions/{version}",
        "/v1/models/{model_id}/versions/{version}/weights",
        "/v1/datasets",
        "/v1/datasets:upload",
        "/v1/datasets/{dataset_id}",
        "/v1/unlearning-jobs",
        "/v1/unlearning-jobs/{job_id}",
        "/v1/unlearning-jobs/{job_id}:cancel",
        "/v1/unlearning-jobs/{job_id}/report",
        "/v1/audit",
        "/v1/unlearning-jobs/{job_id}/events",
        "/v1/unlearning-jobs/{job_id}/webhook-deliveries",
        # Webhook endpoints and the signing secret: tests/app/api/test_webhooks.py.
        "/v1/webhook-endpoints",
        "/v1/webhook-endpoints/{endpoint_id}",
        "/v1/webhook-endpoints/{endpoint_id}/deliveries",
        "/v1/webhook-signing-secret",
        "/v1/webhook-signing-secret:rotate",
        # The service's public report-signing key: no tenant data (tests/app/api/test_reports.py).
        "/v1/report-signing-key",
        "/v1/deletion-requests",
        "/v1/deletion-requests/{request_id}",
        "/v1/deletion-requests/{request_id}:cancel",
        "/v1/models/{model_id}/deletion-policy",
        "/v1/models/{model_id}/deletion-requests:batch",
    }
    routes = {path for path in app.openapi()["paths"] if path.startswith("/v1")}
    assert routes == covered
