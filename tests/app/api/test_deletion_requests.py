"""/v1/deletion-requests: due dates, duplicates, batching policies (manual, count, window),
the requests' states when their job ends, and the versions that carry them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from app.services import deletion_requests
from app.services.deletion_requests import add_months
from app.services.report_signing import SignatureProblem, verify
from tests.app.conftest import Registered, job_body
from tests.app.jobs_driver import (
    GROUP_AFTER,
    GROUP_BEFORE,
    MET_TARGET,
    MISSED_TARGET,
    drive_to_success,
)

URL = "/v1/deletion-requests"


def request_body(registered: Registered, ids=("circle-0",), **changes: object) -> dict:
    body = {
        "model_id": registered.model_id,
        "dataset_id": registered.dataset_id,
        "ids": list(ids) if ids is not None else None,
        "subject_reference": "DSR-1",
        "legal_basis": "GDPR Art. 17",
    }
    body.update(changes)
    return body


def send(client, registered: Registered, ids=("circle-0",), **changes: object):  # type: ignore[no-untyped-def]
    return client.post(
        URL, json=request_body(registered, ids, **changes), headers=registered.caller.headers
    )


def set_policy(client, registered: Registered, target=MET_TARGET, **policy: object) -> None:  # type: ignore[no-untyped-def]
    body = {"mode": "manual", "job": {"variants": {"preset": "tiny-classifier"}, "target": target}}
    body.update(policy)
    response = client.put(
        f"/v1/models/{registered.model_id}/deletion-policy",
        json=body,
        headers=registered.caller.headers,
    )
    assert response.status_code == 200, response.text


def batch(client, registered: Registered):  # type: ignore[no-untyped-def]
    return client.post(
        f"/v1/models/{registered.model_id}/deletion-requests:batch",
        headers=registered.caller.headers,
    )


def get(client, registered: Registered, request_id: str) -> dict:  # type: ignore[no-untyped-def]
    response = client.get(f"{URL}/{request_id}", headers=registered.caller.headers)
    assert response.status_code == 200, response.text
    return response.json()


# ---- due dates ----------------------------------------------------------------------------------


def test_the_due_date_is_one_calendar_month_after_receipt_by_default(client, registered):
    response = send(client, registered, received_at="2026-01-31T09:30:00Z")
    assert response.status_code == 201, response.text
    made = response.json()
    assert response.headers["Location"] == f"{URL}/{made['id']}"
    assert made["state"] == "PENDING" and made["sample_count"] == 1 and made["job_id"] is None
    # 31 January + one month: the last day of February.
    assert made["due_at"] == "2026-02-28T09:30:00Z"
    assert made["overdue"] is True  # that date has passed: nothing settled it

    now = send(client, registered, ids=["circle-1"]).json()
    received = datetime.fromisoformat(now["received_at"])
    assert datetime.fromisoformat(now["due_at"]) == add_months(received, 1)
    assert abs(received - datetime.now(UTC)) < timedelta(minutes=1) and not now["overdue"]


def test_a_given_due_date_is_kept_and_checked(client, registered):
    given = send(client, registered, received_at="2026-03-01T00:00:00Z",
                 due_at="2099-03-15T00:00:00Z").json()  # fmt: skip
    assert given["due_at"] == "2099-03-15T00:00:00Z" and not given["overdue"]
    early = send(client, registered, ids=["circle-1"], received_at="2026-03-01T00:00:00Z",
                 due_at="2026-02-01T00:00:00Z")  # fmt: skip
    assert early.status_code == 422 and "due_at" in early.text
    future = send(client, registered, ids=["circle-1"], received_at="2999-01-01T00:00:00Z")
    assert future.status_code == 422 and "received_at: in the future" in future.text
    naive = send(client, registered, ids=["circle-1"], due_at="2026-02-01T00:00:00")
    assert naive.status_code == 422 and "time zone" in naive.text


def test_add_months_clamps_to_the_months_last_day():
    assert add_months(datetime(2024, 1, 31, tzinfo=UTC), 1) == datetime(2024, 2, 29, tzinfo=UTC)
    assert add_months(datetime(2026, 12, 15, tzinfo=UTC), 1) == datetime(2027, 1, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ids": ["circle-0", "nope-9"]}, "ids"),
        ({"ids": None, "classes": ["hexagon"]}, "classes"),
        ({"classes": ["circle"]}, "ids"),
        ({"subject_reference": ""}, "subject_reference"),
    ],
)
def test_bad_requests_name_the_field(client, registered, change, field):
    response = send(client, registered, **change)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["fields"][0]["field"] == field


# ---- duplicates ---------------------------------------------------------------------------------


def test_a_repeated_request_is_answered_with_the_existing_one(client, registered):
    first = send(client, registered, ids=["circle-0", "circle-1"]).json()
    # Another subject reference, the ids in another order: the same samples.
    again = send(client, registered, ids=["circle-1", "circle-0"], subject_reference="DSR-2")
    assert again.status_code == 200, again.text
    assert again.headers["Duplicate-Of"] == first["id"]
    assert again.json()["id"] == first["id"] and again.json()["duplicate_of"] == first["id"]
    listed = client.get(URL, headers=registered.caller.headers).json()["items"]
    assert [r["id"] for r in listed] == [first["id"]]

    # Some samples held already: refused, naming the request that holds them.
    partly = send(client, registered, ids=["circle-1", "circle-2"])
    assert partly.status_code == 409 and first["id"] in partly.text and "1 of the 2" in partly.text
    # Classes are keys of their own.
    by_class = send(client, registered, ids=None, classes=["square"])
    assert by_class.status_code == 201 and by_class.json()["sample_count"] == 6
    assert send(client, registered, ids=None, classes=["square"]).status_code == 200


def test_the_same_images_in_a_reuploaded_data_set_are_the_same_samples(
    client, registered, shapes_dir
):
    first = send(client, registered).json()
    copy = client.post(
        "/v1/datasets",
        json={"name": "shapes-again", "manifest_uri": str(shapes_dir / "manifest.jsonl")},
        headers=registered.caller.headers,
    ).json()
    again = send(client, registered, dataset_id=copy["id"])
    assert again.status_code == 200 and again.headers["Duplicate-Of"] == first["id"]


def test_a_cancelled_request_frees_its_samples(client, registered):
    first = send(client, registered).json()
    cancelled = client.post(f"{URL}/{first['id']}:cancel", headers=registered.caller.headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"{URL}/{first['id']}:cancel", headers=registered.caller.headers)
    assert again.status_code == 409
    assert send(client, registered).status_code == 201


def test_resubmitting_a_forgotten_set_as_a_job_is_refused_naming_the_job(client, registered):
    body = job_body(registered)
    del body["allow_repeat"]
    headers = registered.caller.headers
    first = client.post("/v1/unlearning-jobs", json=body, headers=headers)
    assert first.status_code == 202
    job_id = first.json()["id"]
    # While it runs, and after it met its target: the same body is refused.
    running = client.post("/v1/unlearning-jobs", json=body, headers=headers)
    assert running.status_code == 409 and job_id in running.text
    assert "allow_repeat" in running.text
    client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=headers)
    # A cancelled job forgot nothing: another is welcome.
    second = client.post("/v1/unlearning-jobs", json={**body, "target": MET_TARGET},
                         headers=headers)  # fmt: skip
    assert second.status_code == 202
    drive_to_success(client.app, second.json()["id"])
    forgotten = client.post("/v1/unlearning-jobs", json=body, headers=headers)
    assert forgotten.status_code == 409 and second.json()["id"] in forgotten.text
    repeated = client.post(
        "/v1/unlearning-jobs", json={**body, "allow_repeat": True}, headers=headers
    )
    assert repeated.status_code == 202 and repeated.json()["model"]["version"] == 2


# ---- batching -----------------------------------------------------------------------------------


def test_manual_batching_makes_one_job_of_the_union_and_settles_each_request(client, registered):
    headers = registered.caller.headers
    assert batch(client, registered).status_code == 409  # no policy yet: it says how
    set_policy(client, registered)
    assert batch(client, registered).status_code == 409  # nothing pending
    one = send(client, registered, ids=["circle-0", "circle-1"]).json()
    two = send(client, registered, ids=["circle-2"], subject_reference="DSR-2").json()
    made = batch(client, registered)
    assert made.status_code == 202, made.text
    job_id = made.json()["job_id"]
    assert made.headers["Location"] == f"/v1/unlearning-jobs/{job_id}"
    assert made.json()["request_ids"] == [one["id"], two["id"]]
    job = client.get(f"/v1/unlearning-jobs/{job_id}", headers=headers).json()
    assert job["forget"]["count"] == 3 and job["model"]["version"] == 1
    assert job["subject_reference"] == "DSR-1, DSR-2"
    for request in (one, two):
        batched = get(client, registered, request["id"])
        assert batched["state"] == "BATCHED" and batched["job_id"] == job_id
        assert batched["attempts"] == 1
    # One batch of a model at a time: the next starts from the version this one makes.
    three = send(client, registered, ids=["circle-3"], subject_reference="DSR-3").json()
    running = batch(client, registered)
    assert running.status_code == 409 and job_id in running.text

    drive_to_success(client.app, job_id)
    for request in (one, two):
        done = get(client, registered, request["id"])
        assert done["state"] == "FORGOTTEN" and done["model_version"] == 2
        assert done["evidence"] == {"before": GROUP_BEFORE, "after": GROUP_AFTER}
        assert done["links"]["model_version"] == f"/v1/models/{registered.model_id}/versions/2"
        assert done["finished_at"] is not None and not done["overdue"]
    version = client.get(f"/v1/models/{registered.model_id}/versions/2", headers=headers).json()
    assert version["deletion_requests"] == [one["id"], two["id"]]
    # A forgotten sample is still recognised.
    assert send(client, registered, ids=["circle-2"]).headers["Duplicate-Of"] == two["id"]

    following = batch(client, registered)
    assert following.status_code == 202 and following.json()["request_ids"] == [three["id"]]
    job = client.get(f"/v1/unlearning-jobs/{following.json()['job_id']}", headers=headers)
    assert job.json()["model"]["version"] == 2
    listed = client.get(URL, params={"state": "FORGOTTEN"}, headers=headers).json()["items"]
    assert {r["id"] for r in listed} == {one["id"], two["id"]}


def test_the_report_names_the_requests_it_carries_with_their_evidence(client, registered):
    headers = registered.caller.headers
    set_policy(client, registered)
    one = send(client, registered, ids=["circle-0", "circle-1"]).json()
    two = send(client, registered, ids=["circle-2"], subject_reference="DSR-2").json()
    job_id = batch(client, registered).json()["job_id"]
    drive_to_success(client.app, job_id)
    report = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=headers).json()
    # Each as GET /v1/deletion-requests/{id} shows it, less what only the API needs.
    api_only = {"overdue", "duplicate_of", "created_at", "updated_at", "links"}
    expected = []
    for request in (one, two):
        shown = get(client, registered, request["id"])
        expected.append({k: v for k, v in shown.items() if k not in api_only})
    assert report["requests"] == expected
    assert [r["evidence"] for r in report["requests"]] == [
        {"before": GROUP_BEFORE, "after": GROUP_AFTER}
    ] * 2
    key = client.get("/v1/report-signing-key").json()
    public_key = load_pem_public_key(key["public_key_pem"].encode())
    assert verify(report, public_key) == key["key_id"]  # the signature covers them
    edited = copy.deepcopy(report)
    edited["requests"][0]["subject_reference"] = "DSR-someone-else"
    with pytest.raises(SignatureProblem):
        verify(edited, public_key)
    # A job submitted directly carries none.
    direct = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers)
    assert direct.status_code == 202, direct.text
    direct_report = client.get(direct.headers["Location"] + "/report", headers=headers).json()
    assert direct_report["requests"] == []


def test_a_target_missed_is_not_forgotten(client, registered):
    set_policy(client, registered, target=MISSED_TARGET)
    made = send(client, registered).json()
    drive_to_success(client.app, batch(client, registered).json()["job_id"])
    settled = get(client, registered, made["id"])
    assert settled["state"] == "NOT_FORGOTTEN" and settled["model_version"] == 2
    # Not forgotten: the samples may be asked for again.
    assert send(client, registered).status_code == 201


def test_a_cancelled_job_puts_its_requests_back_until_attempts_run_out(
    client, registered, settings
):
    set_policy(client, registered)
    made = send(client, registered).json()
    for attempt in range(1, settings.deletion_request_max_attempts + 1):
        job_id = batch(client, registered).json()["job_id"]
        client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=registered.caller.headers)
        back = get(client, registered, made["id"])
        assert back["state"] == "PENDING" and back["attempts"] == attempt
        assert back["job_id"] == job_id
    exhausted = batch(client, registered)
    assert exhausted.status_code == 200 and exhausted.json()["job_id"] is None
    assert exhausted.json()["failed_request_ids"] == [made["id"]]
    assert get(client, registered, made["id"])["state"] == "FAILED"
    assert batch(client, registered).status_code == 409  # nothing left to batch


def test_a_count_policy_starts_a_job_at_its_nth_request(client, registered):
    set_policy(client, registered, mode="count", batch_size=2)
    first = send(client, registered).json()
    assert get(client, registered, first["id"])["state"] == "PENDING"
    second = send(client, registered, ids=["circle-1"]).json()
    assert second["state"] == "BATCHED" and second["job_id"] is not None
    assert get(client, registered, first["id"])["job_id"] == second["job_id"]
    jobs = client.get("/v1/unlearning-jobs", headers=registered.caller.headers).json()["items"]
    assert len(jobs) == 1 and jobs[0]["forget"]["count"] == 2


def test_a_window_policy_starts_a_job_once_the_oldest_has_waited(client, registered, app):
    set_policy(client, registered, mode="window", window_seconds=60)
    first = send(client, registered).json()
    send(client, registered, ids=["circle-1"])
    created = datetime.fromisoformat(first["created_at"])
    db, settings, queue = app.state.db, app.state.settings, app.state.queue
    tenant = registered.caller.tenant_id

    def check(after: float):  # type: ignore[no-untyped-def]
        with db.unit_of_work() as session:
            job = deletion_requests.batch_if_due(
                session, tenant, registered.model_id, settings, queue,
                created + timedelta(seconds=after),
            )  # fmt: skip
            return job.id if job else None

    assert check(30) is None
    assert get(client, registered, first["id"])["state"] == "PENDING"
    job_id = check(61)
    assert job_id is not None
    # A second check (another watchdog, a retry after a crash) makes no second job.
    assert check(120) is None
    assert get(client, registered, first["id"])["job_id"] == str(job_id)
    jobs = client.get("/v1/unlearning-jobs", headers=registered.caller.headers).json()["items"]
    assert len(jobs) == 1 and jobs[0]["forget"]["count"] == 2


def test_an_automatic_batch_that_is_refused_waits_with_the_reason(client, registered):
    # A template naming a retain data set that does not exist: the submission path refuses
    # the job; the request stays PENDING and the policy says why.
    retain = {"dataset_id": "00000000-0000-4000-8000-000000000000"}
    client.put(
        f"/v1/models/{registered.model_id}/deletion-policy",
        json={"mode": "count", "batch_size": 1,
              "job": {"variants": {"preset": "tiny-classifier"}, "retain": retain}},
        headers=registered.caller.headers,
    )  # fmt: skip
    made = send(client, registered)
    assert made.status_code == 201 and made.json()["state"] == "PENDING"
    policy = client.get(
        f"/v1/models/{registered.model_id}/deletion-policy", headers=registered.caller.headers
    ).json()
    assert "no such data set" in policy["last_batch_error"]
    assert (
        client.get("/v1/unlearning-jobs", headers=registered.caller.headers).json()["items"] == []
    )


def test_a_policy_needs_its_parameter(client, registered):
    response = client.put(
        f"/v1/models/{registered.model_id}/deletion-policy",
        json={"mode": "window", "job": {"variants": {"preset": "tiny-classifier"}}},
        headers=registered.caller.headers,
    )
    assert response.status_code == 422 and "window_seconds" in response.text
