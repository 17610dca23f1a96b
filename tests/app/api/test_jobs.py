"""POST/GET /v1/unlearning-jobs: acceptance, idempotency, enqueue-after-commit, cancel, report."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import httpx
import pytest
from sqlalchemy import func, select, text

from app.auth import Principal
from app.db.models import AuditEntry, UnlearningJob
from app.schemas.jobs import UnlearningJobCreate
from app.services.job_submission import submit_job
from tests.app.conftest import job_body
from tests.app.jobs_driver import drive_to_success


def queued_messages(redis_client, settings) -> list[dict]:  # type: ignore[no-untyped-def]
    """The messages waiting in the job queue, decoded."""
    messages = []
    for raw in redis_client.lrange(settings.queue_name, 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        messages.append({"task": envelope["headers"]["task"], "args": args, "kwargs": kwargs})
    return messages


def count_jobs(db) -> int:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        return session.scalar(select(func.count()).select_from(UnlearningJob))


def test_submit_answers_202_with_location_and_queues_one_message(
    client, registered, redis_client, settings
):
    response = client.post(
        "/v1/unlearning-jobs", json=job_body(registered), headers=registered.caller.headers
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/unlearning-jobs/{job['id']}"
    assert response.headers["Retry-After"] == str(settings.retry_after_seconds)
    assert job["state"] == "QUEUED" and job["stage"] is None
    assert job["progress"] == {
        "variants_done": 0,
        "variants_total": 4,
        "lambdas_evaluated": 0,
        "percent": 0.0,
    }
    assert job["forget"]["count"] == 2 and job["model"]["version"] == 1
    # The message names the job and the step, nothing more.
    assert queued_messages(redis_client, settings) == [
        {"task": "negmerge.run_step", "args": [job["id"], "prepare"], "kwargs": {}}
    ]
    got = client.get(response.headers["Location"], headers=registered.caller.headers)
    assert got.status_code == 200 and got.json()["state"] == "QUEUED"
    assert got.headers["Retry-After"] == str(settings.retry_after_seconds)


def test_forget_by_class_and_whole_dataset(client, registered):
    by_class = job_body(
        registered, forget={"dataset_id": registered.dataset_id, "classes": ["square"]}
    )
    response = client.post("/v1/unlearning-jobs", json=by_class, headers=registered.caller.headers)
    assert response.status_code == 202, response.text
    assert response.json()["forget"]["count"] == 6


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"forget": {"ids": ["circle-0", "nope-9"]}}, "forget.ids", "not in"),
        ({"forget": {"classes": ["hexagon"]}}, "forget.classes", "not a label"),
        ({"forget": {"ids": ["circle-5"]}}, "forget", "no training-split samples"),
        ({"forget": {"ids": []}}, "forget.ids", "at least 1"),
        ({"model": {"id": str(uuid.uuid4())}}, "model.id", "no such model"),
        ({"model": {"version": 7}}, "model.version", "no version 7"),
        ({"variants": {"preset": "huge"}}, "variants.preset", "unknown 'huge'"),
        ({"variants": {"grid": {"lr": [0.1] * 40, "epochs": [1] * 40}}}, "variants", "1024"),
        ({"merge": {"method": "mystery"}}, "merge.method", "unknown 'mystery'"),
        (
            {"merge": {"method": "negmerge", "params": {"consensus": 7}}},
            "merge.params",
            "consensus",
        ),
        ({"search": {"rule": "best"}}, "search.rule", "retain-threshold"),
        ({"surprise": 1}, "surprise", "not a known field"),
    ],
)
def test_bad_requests_name_the_field_and_store_nothing(
    client, registered, db, redis_client, settings, change, field, words
):
    body = job_body(registered)
    for key, value in change.items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    response = client.post("/v1/unlearning-jobs", json=body, headers=registered.caller.headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["fields"][0]["field"].startswith(field), error
    assert words in error["message"], error
    for server_path in (*settings.data_roots, settings.artifact_root):
        assert server_path not in response.text  # data sets are named by their ids
    assert count_jobs(db) == 0
    assert queued_messages(redis_client, settings) == []


def test_every_unknown_class_is_named_with_the_closest_labels_and_the_data_sets_name(
    client, registered
):
    forget = {"dataset_id": registered.dataset_id, "classes": ["squre", "circle", "hexagon"]}
    response = client.post(
        "/v1/unlearning-jobs",
        json=job_body(registered, forget=forget),
        headers=registered.caller.headers,
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["fields"][0]["field"] == "forget.classes"
    message = error["message"]
    assert "'hexagon', 'squre' (did you mean 'square'?) are not labels" in message
    assert f"data set 'shapes' ({registered.dataset_id})" in message
    assert "its labels are 'circle', 'square', 'triangle'" in message


def test_unknown_label_in_the_dataset_is_refused_at_submission(
    client, caller, weights_file, data_root
):
    from tests.app.conftest import model_body, write_dataset

    write_dataset(
        data_root / "with-extra-class",
        per_class=4,
        classes=["circle", "square", "triangle", "pentagon"],
    )
    model = client.post("/v1/models", json=model_body(weights_file), headers=caller.headers)
    dataset = client.post(
        "/v1/datasets",
        json={"name": "extra", "manifest_uri": str(data_root / "with-extra-class")},
        headers=caller.headers,
    )
    assert dataset.status_code == 201, dataset.text
    body = {
        "model": {"id": model.json()["id"]},
        "forget": {"dataset_id": dataset.json()["id"], "ids": ["circle-0"]},
        "variants": {"preset": "tiny-classifier"},
    }
    response = client.post("/v1/unlearning-jobs", json=body, headers=caller.headers)
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "forget.dataset_id"
    assert "'pentagon'" in response.json()["error"]["message"]


def test_idempotency_key_same_body_same_job_other_body_422(
    client, registered, redis_client, settings
):
    headers = {**registered.caller.headers, "Idempotency-Key": "req-1"}
    first = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers)
    again = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/unlearning-jobs", json=job_body(registered, seed=5), headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert "Idempotency-Key" in other.json()["error"]["message"]
    assert f"already used by job {first.json()['id']}" in other.json()["error"]["message"]
    assert len(queued_messages(redis_client, settings)) == 1


def test_idempotency_keys_are_per_tenant(client, register, make_caller):
    a, b = register(make_caller("a")), register(make_caller("b"))
    ids = {
        client.post(
            "/v1/unlearning-jobs",
            json=job_body(r),
            headers={**r.caller.headers, "Idempotency-Key": "shared"},
        ).json()["id"]
        for r in (a, b)
    }
    assert len(ids) == 2


def test_fifty_concurrent_duplicates_make_exactly_one_job(
    app, registered, db, redis_client, settings
):
    headers = {**registered.caller.headers, "Idempotency-Key": "burst"}
    body = job_body(registered)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(http.post("/v1/unlearning-jobs", json=body, headers=headers) for _ in range(50))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [202] * 50, [r.text for r in responses][:3]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count_jobs(db) == 1
    assert len(queued_messages(redis_client, settings)) == 1
    with db.unit_of_work() as session:
        created = session.scalar(
            select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "job.created")
        )
    assert created == 1


def test_a_rolled_back_request_enqueues_nothing(app, registered, db, redis_client, settings):
    """The job is added and flushed, then the unit of work fails: no row, no message."""
    principal = Principal(
        registered.caller.tenant_id, registered.caller.key_id, frozenset({"admin"})
    )
    body = UnlearningJobCreate.model_validate(job_body(registered))
    with pytest.raises(RuntimeError, match="after the job was added"), db.unit_of_work() as session:
        submission = submit_job(session, principal, body, None, settings, app.state.queue)
        assert submission.created
        session.flush()
        raise RuntimeError("something failed after the job was added")
    assert count_jobs(db) == 0
    assert queued_messages(redis_client, settings) == []


def test_list_pages_with_an_opaque_token_and_filters(client, registered):
    headers = registered.caller.headers
    ids = []
    for i in range(5):
        body = job_body(registered, subject_reference=f"DSR-{i % 2}")
        ids.append(client.post("/v1/unlearning-jobs", json=body, headers=headers).json()["id"])
    seen, token = [], None
    while True:
        params = {"page_size": 2, **({"page_token": token} if token else {})}
        page = client.get("/v1/unlearning-jobs", params=params, headers=headers).json()
        seen += [job["id"] for job in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == ids[::-1]  # newest first, each once
    only = client.get(
        "/v1/unlearning-jobs", params={"subject_reference": "DSR-1"}, headers=headers
    ).json()["items"]
    assert {job["id"] for job in only} == {ids[1], ids[3]}
    by_state = client.get(
        "/v1/unlearning-jobs", params={"state": ["RUNNING", "FAILED"]}, headers=headers
    ).json()["items"]
    assert by_state == []
    by_model = client.get(
        "/v1/unlearning-jobs", params={"model_id": registered.model_id}, headers=headers
    ).json()["items"]
    assert len(by_model) == 5
    later = client.get(
        "/v1/unlearning-jobs", params={"created_after": "2999-01-01T00:00:00Z"}, headers=headers
    ).json()["items"]
    assert later == []
    bad = client.get("/v1/unlearning-jobs", params={"page_token": "garbage!"}, headers=headers)
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "page_token"


def test_cancel_a_queued_job_then_report_shows_the_timeline(client, registered):
    headers = registered.caller.headers
    job = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers).json()
    cancelled = client.post(f"/v1/unlearning-jobs/{job['id']}:cancel", headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "CANCELLED"
    assert cancelled.json()["finished_at"] is not None
    assert "Retry-After" not in cancelled.headers
    again = client.post(f"/v1/unlearning-jobs/{job['id']}:cancel", headers=headers)
    assert again.status_code == 409 and "CANCELLED" in again.json()["error"]["message"]

    report = client.get(f"/v1/unlearning-jobs/{job['id']}/report", headers=headers)
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["final"] is True and body["state"] == "CANCELLED"
    assert [(e["kind"], e["state"]) for e in body["timeline"]] == [
        ("state", "QUEUED"),
        ("state", "CANCELLED"),
    ]
    assert body["forgotten"]["count"] == 2
    assert body["forget_selection"] == {"ids": ["circle-0", "circle-1"], "classes": None}
    assert len(body["base_model"]["weights_sha256"]) == 64
    assert body["requested_by"]["legal_basis"] == "GDPR Art. 17"
    assert body["unlearned_model"] is None and body["metrics"] is None


def test_get_shows_the_job_as_every_other_endpoint_does(client, registered, make_caller):
    """GET reads through its own lean path (one statement, serialised once); what it answers
    must not drift from the job other endpoints show."""
    headers = registered.caller.headers
    submitted = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers)
    job_id = submitted.json()["id"]
    got = client.get(f"/v1/unlearning-jobs/{job_id}", headers=headers)
    assert got.headers["content-type"] == "application/json"
    listed = client.get("/v1/unlearning-jobs", headers=headers).json()["items"]
    assert got.json() == submitted.json() == listed[0]
    other = make_caller("globex", ("jobs:read",))
    assert client.get(f"/v1/unlearning-jobs/{job_id}", headers=other.headers).status_code == 404


def test_concurrent_gets_each_get_their_own_tenants_job(app, client, register, make_caller):
    """Concurrent GETs are read together, one query per batch of waiting requests: each still
    answers with its own job, and a job id of another tenant finds nothing."""
    tenants = [register(make_caller(name)) for name in ("acme", "globex")]
    jobs = [
        client.post("/v1/unlearning-jobs", json=job_body(t), headers=t.caller.headers).json()
        for t in tenants
    ]
    asks = [(asker, owner) for asker in (0, 1) for owner in (0, 1)] * 25

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(
                    http.get(jobs[owner]["links"]["self"], headers=tenants[asker].caller.headers)
                    for asker, owner in asks
                )
            )

    for (asker, owner), response in zip(asks, asyncio.run(burst()), strict=True):
        if asker == owner:
            assert response.status_code == 200 and response.json() == jobs[owner]
        else:
            assert response.status_code == 404, response.text


def test_get_survives_the_database_dropping_its_connections(client, registered, db):
    """The read pool has no pre-ping: a connection the server closed (a restart) fails once,
    is discarded, and the read is retried on a new one."""
    headers = registered.caller.headers
    job_id = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers).json()[
        "id"
    ]
    assert client.get(f"/v1/unlearning-jobs/{job_id}", headers=headers).status_code == 200
    with db.engine.connect() as connection:
        killed = connection.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    assert killed >= 1
    again = client.get(f"/v1/unlearning-jobs/{job_id}", headers=headers)
    assert again.status_code == 200 and again.json()["id"] == job_id


def test_unknown_job_is_404_and_bad_id_is_422(client, caller):
    missing = client.get(f"/v1/unlearning-jobs/{uuid.uuid4()}", headers=caller.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = client.get("/v1/unlearning-jobs/not-a-uuid", headers=caller.headers)
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "job_id"


def test_a_body_not_labelled_json_is_415(client, registered):
    response = client.post(
        "/v1/unlearning-jobs",
        content=json.dumps(job_body(registered)),
        headers={**registered.caller.headers, "Content-Type": "text/plain"},
    )
    assert response.status_code == 415, response.text
    assert "Content-Type: application/json" in response.json()["error"]["message"]


def test_oversize_body_is_413(client, registered, settings):
    body = job_body(registered, subject_reference="x" * (settings.max_body_bytes + 10))
    response = client.post("/v1/unlearning-jobs", json=body, headers=registered.caller.headers)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_oversize_body_without_content_length_is_413(client, registered, settings):
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(settings.max_body_bytes // 1000 + 2):
            yield b" " * 1000

    response = client.post(
        "/v1/unlearning-jobs",
        content=chunks(),
        headers={**registered.caller.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 413


def test_invalid_json_names_the_body(client, registered):
    response = client.post(
        "/v1/unlearning-jobs",
        content=b"{not json",
        headers={**registered.caller.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "body"


def test_a_finished_job_has_no_current_stage(app, client, registered):
    headers = registered.caller.headers
    job = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers).json()
    drive_to_success(app, job["id"])
    done = client.get(f"/v1/unlearning-jobs/{job['id']}", headers=headers).json()
    assert done["state"] == "SUCCEEDED" and done["stage"] is None
    listed = client.get("/v1/unlearning-jobs", headers=headers).json()["items"]
    assert [j["stage"] for j in listed if j["id"] == job["id"]] == [None]
    # The timeline still says which stage the job ended in.
    report = client.get(f"/v1/unlearning-jobs/{job['id']}/report", headers=headers).json()
    assert report["timeline"][-1]["stage"] == "storing"
