"""Paths a tenant names: one answer for a file outside its data roots
and for a missing one, so that no answer tells whether a file the tenant may not read exists;
with `{tenant}` in a data root, each tenant reads only its own folder."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import model_body, write_dataset


def problem(response) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 422, response.text
    (error,) = response.json()["error"]["fields"]
    return error["field"], error["problem"]


def test_outside_and_missing_get_the_same_answer(client, caller, weights_file, settings, data_root):
    """A stored model in the artifact root (another tenant's, as a worker leaves it) and a
    path there that does not exist are answered alike; so is a missing path in the caller's
    own data root."""
    stored = Path(settings.artifact_root) / "models" / str(uuid.uuid4()) / "a.safetensors"
    stored.parent.mkdir(parents=True)
    shutil.copyfile(weights_file, stored)
    answers = {
        uri: problem(
            client.post(
                "/v1/models",
                json={**model_body(weights_file), "weights_uri": uri},
                headers=caller.headers,
            )
        )
        for uri in (
            str(stored),
            str(stored.with_name("missing.safetensors")),
            str(data_root / "weights" / "missing.safetensors"),
            "/etc/passwd",
        )
    }
    assert len(set(answers.values())) == 1, answers
    field, text = next(iter(answers.values()))
    assert field == "weights_uri" and "does not exist" in text
    assert str(settings.artifact_root) not in text


def test_a_manifest_says_nothing_about_files_it_may_not_read(client, caller, tmp_path, data_root):
    """'not valid JSON' vs 'no such manifest file' told whether a path outside existed."""
    not_json = tmp_path / "elsewhere" / "manifest.jsonl"
    not_json.parent.mkdir()
    not_json.write_text("{not json\n")
    answers = {
        uri: problem(
            client.post(
                "/v1/datasets", json={"name": "x", "manifest_uri": uri}, headers=caller.headers
            )
        )
        for uri in (
            str(not_json),
            str(not_json.with_name("missing.jsonl")),
            str(data_root / "nothing-here" / "manifest.jsonl"),
        )
    }
    assert len(set(answers.values())) == 1, answers
    assert next(iter(answers.values()))[0] == "manifest_uri"


@pytest.fixture
def per_tenant(app, settings, db, service_root):  # type: ignore[no-untyped-def]
    """The same service with data roots of one folder per tenant."""
    tenants = service_root / "tenants"
    per_tenant = settings.model_copy(update={"data_roots": [str(tenants / "{tenant}")]})
    application = create_app(per_tenant)
    with TestClient(application, raise_server_exceptions=False) as client:
        yield client, tenants
    application.state.db.dispose()
    shutil.rmtree(tenants, ignore_errors=True)


def test_with_a_folder_per_tenant_another_tenants_files_cannot_be_named(
    per_tenant, make_caller, weights_file
):
    client, tenants = per_tenant
    alice, bob = make_caller("alice"), make_caller("bob")
    own = tenants / str(alice.tenant_id) / "base.safetensors"
    own.parent.mkdir(parents=True)
    shutil.copyfile(weights_file, own)
    write_dataset(own.parent / "shapes")
    manifest = str(own.parent / "shapes" / "manifest.jsonl")

    body = {**model_body(weights_file), "weights_uri": str(own)}
    crossed = problem(client.post("/v1/models", json=body, headers=bob.headers))
    missing = {**body, "weights_uri": str(tenants / str(bob.tenant_id) / "base.safetensors")}
    assert crossed == problem(client.post("/v1/models", json=missing, headers=bob.headers))
    dataset = {"name": "shapes", "manifest_uri": manifest}
    assert problem(client.post("/v1/datasets", json=dataset, headers=bob.headers))[0] == (
        "manifest_uri"
    )

    assert client.post("/v1/models", json=body, headers=alice.headers).status_code == 201
    assert client.post("/v1/datasets", json=dataset, headers=alice.headers).status_code == 201
