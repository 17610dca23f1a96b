"""Retention with real worker processes: when a job ends, the worker that ended it deletes
the forgotten samples' files of an uploaded data set and the job's intermediates, and
records it; the version the job unlearned from is blocked. A cancelled job loses its
intermediates and keeps the data."""

from __future__ import annotations

import hashlib
import io
import uuid
import zipfile
from pathlib import Path

import pytest

from app.auth import hash_key
from app.db.models import UnlearningJob
from app.db.repositories import ApiKeyRepository
from app.services import retention
from tests.worker.conftest import TWO_VARIANTS, register_tenant, submit, wait_for

LOOSE = {"forget_acc_max": 100.0, "retain_ratio": 0.5}


@pytest.fixture(scope="module")
def worker(start_worker, watchdog):  # type: ignore[no-untyped-def]
    process = start_worker("retention")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tenant(client, db, classifier):  # type: ignore[no-untyped-def]
    """A tenant with the service's default retention policy and digits uploaded."""
    registered = register_tenant(client, db, classifier)
    key = registered.headers["Authorization"].removeprefix("Bearer ")
    with db.unit_of_work() as session:
        row = ApiKeyRepository(session).find_by_hash(hash_key(key)).tenant
        retention.set_policy(session, row, {"forget_data": "delete", "intermediates": "delete",
                                            "superseded": "block"}, "test")  # fmt: skip
    buffer = io.BytesIO()
    root = Path(classifier.dataset_root)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name != "classes.json":  # the manifest and images
                archive.write(path, path.relative_to(root).as_posix())
    uploaded = client.post(
        "/v1/datasets:upload",
        files={"file": ("digits.zip", buffer.getvalue(), "application/zip")},
        data={"name": "digits-upload"},
        headers=registered.headers,
    )
    assert uploaded.status_code == 201, uploaded.text
    return registered, uploaded.json()


def body(registered, dataset: dict, classes: list[str], version: int) -> dict:  # type: ignore[no-untyped-def]
    return {
        "model": {"id": registered.model_id, "version": version},
        "forget": {"dataset_id": dataset["id"], "classes": classes},
        "variants": TWO_VARIANTS,
        "max_eval_samples": 64,
        "target": LOOSE,
    }


def stored_images(settings, registered_dataset: dict, tenant_id) -> dict[str, int]:  # type: ignore[no-untyped-def]
    root = Path(settings.artifact_root) / "datasets" / str(tenant_id) / registered_dataset["id"]
    counts: dict[str, int] = {}
    for path in root.rglob("*.png"):
        counts[path.parent.name] = counts.get(path.parent.name, 0) + 1
    return counts


def tenant_id_of(db, job_id: str):  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        return session.get(UnlearningJob, uuid.UUID(job_id)).tenant_id


def test_a_finished_job_leaves_its_model_and_its_records_and_nothing_of_the_data(
    client, db, settings, tenant, worker
):
    registered, dataset = tenant
    job_id = submit(client, registered, body(registered, dataset, ["three"], 1))
    owner = tenant_id_of(db, job_id)
    before = stored_images(settings, dataset, owner)
    job = wait_for(client, registered, job_id, lambda j: j["data_deletion"] is not None, 300)
    assert job["state"] == "SUCCEEDED" and job["verdict"]["met"], job

    work = Path(settings.artifact_root) / "jobs" / job_id
    assert not list(work.rglob("*.safetensors"))  # base copy, variants, merged, model copy
    assert (work / "report.json").is_file() and (work / "original.json").is_file()
    assert not (Path(settings.scratch_root) / "bases" / job_id).exists()
    after = stored_images(settings, dataset, owner)
    assert "three" not in after and {k: v for k, v in before.items() if k != "three"} == after

    record = job["data_deletion"]
    assert record["forget_data"]["deleted"] and record["forget_data"]["samples"] == before["three"]
    # The task vectors and the decoded forget set went at the merge; the base copy, the
    # merged vector and the model's work copy are left for retention.
    assert record["intermediates"]["deleted"] and record["intermediates"]["files"] == 3
    assert record["intermediates"]["bytes"] > 0
    shown = client.get(f"/v1/datasets/{dataset['id']}", headers=registered.headers).json()
    assert shown["sample_count"] == dataset["sample_count"] - before["three"]

    # The new version stays and downloads; the one it was unlearned from is blocked.
    versions = f"/v1/models/{registered.model_id}/versions"
    weights = client.get(f"{versions}/2/weights", headers=registered.headers)
    assert weights.status_code == 200
    assert hashlib.sha256(weights.content).hexdigest() == job["result"]["model"]["weights_sha256"]
    assert client.get(f"{versions}/1/weights", headers=registered.headers).status_code == 410


def test_a_cancelled_job_loses_its_intermediates_and_keeps_the_data(
    client, db, settings, tenant, worker
):
    registered, dataset = tenant
    job_id = submit(client, registered, body(registered, dataset, ["four"], 2))
    owner = tenant_id_of(db, job_id)
    before = stored_images(settings, dataset, owner)
    wait_for(client, registered, job_id, lambda j: j["stage"] == "finetuning", 200)
    cancel = client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=registered.headers)
    assert cancel.status_code == 200, cancel.text
    job = wait_for(client, registered, job_id, lambda j: j["data_deletion"] is not None, 200)
    assert job["state"] == "CANCELLED", job

    assert not list((Path(settings.artifact_root) / "jobs" / job_id).rglob("*.safetensors"))
    assert stored_images(settings, dataset, owner) == before
    record = job["data_deletion"]
    assert record["intermediates"]["deleted"] and not record["forget_data"]["deleted"]
    assert "CANCELLED" in record["forget_data"]["reason"]
