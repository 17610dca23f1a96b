"""Error text never carries object reprs (`<_io.BytesIO object at 0x...>`): they tell a user
nothing and an attacker where the process's heap is."""

from __future__ import annotations

import uuid

from app.db.models import UnlearningJob
from app.errors import without_reprs
from app.services.steps import fail_job
from tests.app.conftest import job_body, write_dataset

PILLOW_MESSAGE = "cannot identify image file <_io.BytesIO object at 0x7f3a2c1d5e40>"


def test_without_reprs_keeps_the_words_and_drops_the_addresses():
    assert without_reprs(f"not a readable image ({PILLOW_MESSAGE})") == (
        "not a readable image (cannot identify image file)"
    )
    assert without_reprs("<function f at 0x1234> failed; <b>bold</b> stays") == (
        " failed; <b>bold</b> stays"
    )


def test_an_unreadable_image_is_named_without_a_repr(client, caller, data_root):
    root = data_root / f"broken-{uuid.uuid4().hex[:8]}"
    write_dataset(root, per_class=3)
    (root / "circle" / "1.png").write_bytes(b"this is text, not a PNG")
    response = client.post(
        "/v1/datasets",
        json={"name": "broken", "manifest_uri": str(root / "manifest.jsonl")},
        headers=caller.headers,
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "not a readable image" in error["message"]
    for text in [error["message"], *(f["problem"] for f in error["fields"])]:
        assert "0x" not in text and "object at" not in text, text


def test_a_failed_jobs_error_is_stored_without_reprs(client, registered, db):
    headers = registered.caller.headers
    job_id = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers).json()[
        "id"
    ]
    with db.unit_of_work() as session:
        job = session.get(UnlearningJob, uuid.UUID(job_id))
        fail_job(session, job, "data_error", f"prepare: sample 'x': {PILLOW_MESSAGE}")
    error = client.get(f"/v1/unlearning-jobs/{job_id}", headers=headers).json()["error"]
    assert error == {
        "code": "data_error",
        "message": "prepare: sample 'x': cannot identify image file",
    }
    report = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=headers).json()
    assert "0x" not in report["error"]["message"]
