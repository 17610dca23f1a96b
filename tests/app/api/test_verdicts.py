"""The verdict through the API: the job resource, the report, the end's SSE event and the
webhook, for a target met, one not met, and lambda 0 (no model version). Jobs are finished
with the workers' functions (tests/app/jobs_driver.py); the verdict is the library's."""

from __future__ import annotations

import json

from sqlalchemy import select

from app.db.models import WebhookDelivery
from tests.app.api.test_events import parse
from tests.app.jobs_driver import MET_TARGET, MISSED_TARGET, drive_to_success, submit


def get(client, caller, path: str) -> dict:  # type: ignore[no-untyped-def]
    response = client.get(path, headers=caller.headers)
    assert response.status_code == 200, response.text
    return response.json()


def finish(app, client, registered, grid=None, **changes):  # type: ignore[no-untyped-def]
    job_id = submit(client, registered, **changes)
    drive_to_success(app, job_id, grid=grid)
    caller = registered.caller
    return (
        get(client, caller, f"/v1/unlearning-jobs/{job_id}"),
        get(client, caller, f"/v1/unlearning-jobs/{job_id}/report"),
    )


def end_event(client, caller, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    url = f"/v1/unlearning-jobs/{job_id}/events"
    with client.stream("GET", url, headers=caller.headers) as response:
        messages = parse(response.iter_lines())
    assert messages[-1]["event"] == "state"
    return messages[-1]["data"]


def test_a_target_met_is_a_success_everywhere(app, client, registered, settings, monkeypatch):
    monkeypatch.setattr(settings, "webhook_allow_private", True)
    job, report = finish(
        app, client, registered, target=MET_TARGET, webhook_url="http://127.0.0.1:9/hook"
    )
    assert job["state"] == "SUCCEEDED"
    verdict = job["verdict"]
    assert verdict["met"] is True and verdict["reason"].startswith("target met")
    assert verdict["target"]["forget_acc_max"] == 50.0 and verdict["default_target"] is False
    assert job["result"]["verdict"] == verdict and job["result"]["model"]["version"] == 2
    assert report["verdict"] == verdict and report["unlearned_model"]["version"] == 2
    assert report["target"]["forget_acc_max"] == 50.0
    assert end_event(client, registered.caller, job["id"])["details"]["verdict"]["met"] is True

    with app.state.db.unit_of_work() as session:
        delivery = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"])
        ).one()
        assert delivery.event_type == "unlearning_job.succeeded"
        assert delivery.payload["data"]["verdict"] == {"met": True, "reason": verdict["reason"]}


def test_a_target_not_met_is_plainly_not_a_success(app, client, registered, settings, monkeypatch):
    monkeypatch.setattr(settings, "webhook_allow_private", True)
    job, report = finish(
        app, client, registered, target=MISSED_TARGET, webhook_url="http://127.0.0.1:9/hook"
    )
    assert job["state"] == "SUCCEEDED"  # it ran to the end...
    verdict = job["verdict"]
    assert verdict["met"] is False  # ...and did not forget as asked
    failed = [c for c in verdict["checks"] if not c["met"]]
    assert {(c["bound"], c["metric"]) for c in failed} == {
        ("forget_acc_max", "forget_acc"),
        ("forget_acc_max", "forget_test_acc"),
    }
    assert "forget accuracy 25.00 (must be <= 0)" in verdict["reason"]
    assert report["verdict"] == verdict
    end = end_event(client, registered.caller, job["id"])
    assert end["details"]["verdict"] == {"met": False, "reason": verdict["reason"]}

    with app.state.db.unit_of_work() as session:
        delivery = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"])
        ).one()
        assert delivery.event_type == "unlearning_job.target_not_met"
        assert json.loads(json.dumps(delivery.payload))["data"]["verdict"]["met"] is False


def test_lambda_zero_makes_no_model_version_and_says_why(app, client, registered):
    job, report = finish(app, client, registered, grid=[0.0], target=MET_TARGET)
    verdict = job["verdict"]
    assert job["result"]["lambda"] == 0 and verdict["met"] is False
    assert "chose 0" in verdict["reason"] and "nothing was forgotten" in verdict["reason"]
    assert job["result"]["model"] is None and report["unlearned_model"] is None
    versions = get(client, registered.caller, f"/v1/models/{registered.model_id}/versions")
    assert [v["version"] for v in versions["items"]] == [1]


def test_the_default_target_depends_on_the_kind_of_request(app, client, registered):
    samples, report = finish(app, client, registered)  # forget by ids
    assert samples["verdict"]["kind"] == "samples" and samples["verdict"]["default_target"]
    assert report["default_target"] is True and report["target"]["holdout_gap_max"] == 8.0
    # 25% forget accuracy against 86.25% held-out: far from what a retrained model shows.
    assert samples["verdict"]["met"] is False

    classes = submit(client, registered, forget={"dataset_id": registered.dataset_id,
                                                 "classes": ["circle"]})  # fmt: skip
    report = get(client, registered.caller, f"/v1/unlearning-jobs/{classes}/report")
    assert report["verdict"] is None and report["target"]["forget_acc_max"] == 10.0


def test_a_bad_target_is_a_422_naming_the_field(client, registered):
    for target, field in (
        ({"retain_ratio": 0.9}, "target"),
        ({"forget_acc_max": 150}, "target.forget_acc_max"),
        ({"forget_acc_max": 5, "colour": "red"}, "target.colour"),
    ):
        response = client.post(
            "/v1/unlearning-jobs",
            json={
                "model": {"id": registered.model_id},
                "forget": {"dataset_id": registered.dataset_id, "ids": ["circle-0"]},
                "variants": {"preset": "tiny-classifier"},
                "target": target,
            },
            headers=registered.caller.headers,
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["fields"][0]["field"] == field, response.text
