"""Model versions stored as their parent plus a sparse delta, through real workers.

v1 is the tenant's file; a job on it makes v2 (dense: its parent is not in the store), a
job on v2 makes v3 (a delta), and a job on v3 loads its base by materialising the chain
and makes v4 (a delta of depth 2). Every download is the dense bytes with the version's
sha256.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from app.db.models import ModelVersion
from app.version_store import chain_depth, delta_key_of
from negmerge.io import file_sha256
from tests.worker.conftest import job_body, register_tenant, submit, wait_for


@pytest.fixture(scope="module")
def worker(start_worker, watchdog):  # type: ignore[no-untyped-def]
    process = start_worker("deltas")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def own_tenant(client, db, classifier):  # type: ignore[no-untyped-def]
    return register_tenant(client, db, classifier)  # its model's versions are this module's


def _unlearn(client, tenant, version: int, forget: str) -> dict:  # type: ignore[no-untyped-def]
    body = job_body(tenant, model={"id": tenant.model_id, "version": version})
    body["forget"]["classes"] = [forget]
    # What is tested is storage: a chain of versions, each already missing a digit, whose
    # search at the default retain floor (0.95) can stop at lambda 0, making no version.
    body["search"] = {"retain_ratio": 0.5}
    job = wait_for(client, tenant, submit(client, tenant, body), timeout=240)
    assert job["state"] == "SUCCEEDED", job
    assert job["result"]["model"]["version"] == version + 1, job["result"]
    return job


def _stored(db, model_id: str, version: int) -> ModelVersion:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        found = (
            session.query(ModelVersion)
            .filter_by(model_id=uuid.UUID(model_id), version=version)
            .one()
        )
        session.expunge(found)
        return found


def test_a_job_on_a_delta_stored_version_works_and_downloads_stream_dense_bytes(
    client, own_tenant, worker, db, settings, app
):
    from app.artifacts import store_for

    store = store_for(settings)
    tenant = own_tenant
    _unlearn(client, tenant, 1, "three")
    v2 = _stored(db, tenant.model_id, 2)
    assert delta_key_of(store, v2.weights_uri) is None  # on the tenant's file: dense

    _unlearn(client, tenant, 2, "seven")
    v3 = _stored(db, tenant.model_id, 3)
    key3 = delta_key_of(store, v3.weights_uri)
    assert key3 is not None and chain_depth(store, key3) == 1
    assert store.size(key3) < v3.size_bytes / 2  # a small file beside the dense v2

    job = _unlearn(client, tenant, 3, "one")  # its base is materialised from the chain
    report = json.loads(
        (Path(settings.artifact_root) / "jobs" / job["id"] / "report.json").read_text()
    )
    assert report["base_model"]["weights_sha256"] == v3.weights_sha256, report["base_model"]
    v4 = _stored(db, tenant.model_id, 4)
    key4 = delta_key_of(store, v4.weights_uri)
    assert key4 is not None and chain_depth(store, key4) == 2

    for version in (v2, v3, v4):
        url = f"/v1/models/{tenant.model_id}/versions/{version.version}/weights"
        with client.stream("GET", url, headers=tenant.headers) as response:
            assert response.status_code == 200
            assert response.headers["x-checksum-sha256"] == version.weights_sha256
            assert int(response.headers["content-length"]) == version.size_bytes
            digest, size = hashlib.sha256(), 0
            for block in response.iter_bytes():
                digest.update(block)
                size += len(block)
        assert digest.hexdigest() == version.weights_sha256 and size == version.size_bytes
    # The dense file the job wrote is the bytes the download made.
    assert file_sha256(report["model"]["path"]) == v4.weights_sha256
    assert not (Path(settings.scratch_root) / "bases" / job["id"]).exists()  # cleaned up
