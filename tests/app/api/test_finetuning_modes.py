"""A job's fine-tuning mode (standard or linear) and the mode its model version records."""

from __future__ import annotations

import uuid

from app.services import retention
from tests.app.conftest import job_body
from tests.app.jobs_driver import drive_to_success


def post(client, registered, **changes):
    return client.post(
        "/v1/unlearning-jobs",
        json=job_body(registered, **changes),
        headers=registered.caller.headers,
    )


def refused(response, words: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["fields"][0]["field"] == "finetuning", error
    assert words in error["message"], error


def test_a_lineage_keeps_one_mode(app, client, registered):
    linear = post(client, registered, finetuning="linear", model={"id": registered.model_id})
    assert linear.status_code == 202, linear.text
    job = client.get(
        f"/v1/unlearning-jobs/{linear.json()['id']}", headers=registered.caller.headers
    )
    assert job.json()["state"] == "QUEUED"
    result = drive_to_success(app, linear.json()["id"])
    assert result["finetuning"] == "linear" and result["model"]["version"] == 2

    versions = client.get(
        f"/v1/models/{registered.model_id}/versions", headers=registered.caller.headers
    ).json()["items"]
    assert [(v["version"], v["finetuning"]) for v in versions] == [(1, "standard"), (2, "linear")]

    on_linear = {"id": registered.model_id, "version": 2}
    # A standard job would fine-tune the plain network and drop the tangent delta.
    refused(post(client, registered, model=on_linear), "version 2 is a linearized model")
    assert post(client, registered, model=on_linear, finetuning="linear").status_code == 202

    # Version 1 is superseded by 2 (retention blocks it as a base): kept, for a second lineage.
    with app.state.db.unit_of_work() as session:
        one = retention.get_version(
            session, registered.caller.tenant_id, uuid.UUID(registered.model_id), 1
        )
        retention.keep_version(session, one, "a standard lineage beside the linear one", "test")
    standard = post(client, registered, model={"id": registered.model_id, "version": 1})
    assert standard.status_code == 202, standard.text
    assert drive_to_success(app, standard.json()["id"])["model"]["version"] == 3
    on_standard = {"id": registered.model_id, "version": 3}
    refused(
        post(client, registered, model=on_standard, finetuning="linear"),
        "version 3 was made by a standard job",
    )
    assert post(client, registered, model=on_standard).status_code == 202


def test_an_unknown_mode_is_refused_by_name(client, registered):
    response = post(client, registered, finetuning="sparse")
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "finetuning"
