"""Retention through the API on PostgreSQL: what a finished job's retention deletes (and
what it keeps), tombstones of data sets and versions, superseded versions.

Jobs are driven through their steps as the workers do (tests/app/jobs_driver); retention is
carried out by worker.retention.apply_due, the watchdog's pass, on a work directory laid out
as the pipeline writes it."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.artifacts import store_for
from app.services import steps
from app.services.models import add_version
from app.settings import Settings, get_settings
from app.version_store import delta_key_of, store_version
from negmerge.cli import main
from negmerge.io import file_sha256, save_file
from tests.app.api.test_datasets import manifest, png_bytes, upload, zip_of
from tests.app.conftest import CLASSES, Registered
from tests.app.jobs_driver import MET_TARGET, MISSED_TARGET, OWNER, drive_to_success, submit
from tests.negmerge.test_version_delta import _model, _unlearn
from worker.retention import apply_due, apply_retention

# What a work directory holds when a job ends (negmerge.workdir.Workdir): weights files go,
# the JSON records stay.
WEIGHTS = ["base.safetensors", "variants/000-a.safetensors", "variants/001-b.safetensors",
           "merged.safetensors", "model.safetensors", "decoded.safetensors",
           "rounds/1/merged.safetensors"]  # fmt: skip
RECORDS = ["job.json", "original.json", "search.json", "report.json", "variants/000-a.json"]


@pytest.fixture
def retention_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The API's settings with a scratch folder of this test's own."""
    return settings.model_copy(update={"scratch_root": str(tmp_path / "scratch")})


@pytest.fixture
def admin(db, settings, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NEGMERGE_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(main, ["admin", *args])
        assert result.exit_code == code, result.output
        return result.output

    yield run
    get_settings.cache_clear()


def uploaded(client, registered: Registered, n: int = 9, name: str = "uploaded") -> dict:  # type: ignore[no-untyped-def]
    rows = [{"id": f"u{i}", "path": f"img/{i}.png", "label": CLASSES[i % 3],
             "split": "val" if i > 6 else "train"} for i in range(n)]  # fmt: skip
    files = {"manifest.jsonl": manifest(rows)}
    files.update({f"img/{i}.png": png_bytes((i, 7 * i, 3)) for i in range(n)})
    response = upload(client, registered.caller, zip_of(files), name=name)
    assert response.status_code == 201, response.text
    return response.json()


def dataset_root(settings: Settings, registered: Registered, dataset: dict) -> Path:
    return (
        Path(settings.artifact_root) / "datasets" / str(registered.caller.tenant_id) / dataset["id"]
    )


def lay_out_workdir(settings: Settings, job_id: str) -> dict[str, bytes]:
    """The job's work directory and its materialised base, as a worker leaves them."""
    files: dict[str, bytes] = {}
    work = Path(settings.artifact_root) / "jobs" / job_id
    for i, name in enumerate(WEIGHTS + RECORDS):
        files[str(work / name)] = f"{name} {i}".encode() * (i + 1)
    files[str(Path(settings.scratch_root) / "bases" / job_id / "b.safetensors")] = b"base" * 9
    for path, data in files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return files


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def get_job(client, registered: Registered, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    return client.get(f"/v1/unlearning-jobs/{job_id}", headers=registered.caller.headers).json()


def audit_actions(client, registered: Registered, action: str) -> list[dict]:  # type: ignore[no-untyped-def]
    response = client.get(f"/v1/audit?action={action}", headers=registered.caller.headers)
    assert response.status_code == 200, response.text
    return response.json()["items"]


def fail(app, job_id: str) -> None:  # type: ignore[no-untyped-def]
    """The job's first step fails for good, as a worker records it."""
    db, settings = app.state.db, app.state.settings
    with db.unit_of_work() as session:
        claim = steps.claim_step(session, uuid.UUID(job_id), steps.PREPARE, OWNER, settings)
    with db.unit_of_work() as session:
        steps.step_failed(session, claim, "data_error", "prepare: the data could not be read")


def test_success_deletes_the_forgotten_samples_and_the_intermediates_and_nothing_else(
    app, client, db, registered, retention_settings
):
    s = retention_settings
    data = uploaded(client, registered)
    other = uploaded(client, registered, name="other")
    job_id = submit(client, registered, forget={"dataset_id": data["id"], "ids": ["u0", "u1"]},
                    target=MET_TARGET)  # fmt: skip
    mine = lay_out_workdir(s, job_id)
    others = lay_out_workdir(s, str(uuid.uuid4()))  # another job's: untouched
    root = dataset_root(s, registered, data)
    forgotten = {str(root / "img/0.png"), str(root / "img/1.png")}
    before = snapshot(Path(s.artifact_root)) | snapshot(Path(s.scratch_root))
    drive_to_success(app, job_id)
    # Pending from the transaction that ended the job; nothing deleted yet.
    assert get_job(client, registered, job_id)["data_deletion"] is None

    assert apply_due(db, store_for(s), s) == {"retention_done": 1}

    after = snapshot(Path(s.artifact_root)) | snapshot(Path(s.scratch_root))
    deleted = {p for p in before if p not in after}
    weights = {p for p in mine if p.endswith(".safetensors")}
    # The forgotten samples' images, every weights file of the job, their sidecars: only them.
    assert {p for p in deleted if not p.endswith(".sha256")} == weights | forgotten
    assert all(after[p] == mine[p] for p in mine if p not in weights)  # the JSON records stay
    assert all(after[p] == others[p] for p in others)
    assert all(after[p] == before[p] for p in after if other["id"] in p)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"u{i}" for i in range(2, 9)]

    job = get_job(client, registered, job_id)
    record = job["data_deletion"]
    assert record["policy"] == {"forget_data": "delete", "intermediates": "delete",
                                "superseded": "block"}  # fmt: skip
    assert record["forget_data"]["deleted"] is True
    assert record["forget_data"]["files"] == record["forget_data"]["samples"] == 2
    assert record["forget_data"]["bytes"] == sum(len(before[p]) for p in forgotten)
    assert record["forget_data"]["manifest_sha256"] == job["forget"]["manifest_sha256"]
    assert record["intermediates"]["deleted"] is True
    assert record["intermediates"]["files"] == len(weights)
    assert record["intermediates"]["bytes"] == sum(len(mine[p]) for p in weights)
    assert record["deleted_at"]
    report = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=registered.caller.headers)
    assert report.json()["data_deletion"] == record
    [entry] = audit_actions(client, registered, "job.data_deleted")
    assert entry["resource_id"] == job_id and entry["details"]["forget_data"]["files"] == 2

    dataset = client.get(f"/v1/datasets/{data['id']}", headers=registered.caller.headers).json()
    assert dataset["sample_count"] == 7 and dataset["deleted_at"] is None
    assert dataset["manifest_sha256"] != data["manifest_sha256"]
    # The forgotten ids are gone from the data set; the rest still serves a job.
    again = client.post("/v1/unlearning-jobs", headers=registered.caller.headers, json={
        "model": {"id": registered.model_id, "version": 2},
        "forget": {"dataset_id": data["id"], "ids": ["u0"]},
        "variants": {"preset": "tiny-classifier"}})  # fmt: skip
    assert again.status_code == 422 and again.json()["error"]["fields"][0]["field"] == "forget.ids"

    # A second run (a duplicate, a restart) deletes nothing more and keeps the record.
    assert apply_retention(db, store_for(s), s, uuid.UUID(job_id)) is None
    assert get_job(client, registered, job_id)["data_deletion"] == record
    assert snapshot(Path(s.artifact_root)) | snapshot(Path(s.scratch_root)) == after


@pytest.mark.parametrize("ending", ["failed", "cancelled", "missed"])
def test_a_job_that_did_not_forget_loses_its_intermediates_but_keeps_the_data(
    app, client, db, registered, retention_settings, ending
):
    s = retention_settings
    data = uploaded(client, registered)
    target = MISSED_TARGET if ending == "missed" else MET_TARGET
    job_id = submit(client, registered, forget={"dataset_id": data["id"], "ids": ["u0"]},
                    target=target)  # fmt: skip
    mine = lay_out_workdir(s, job_id)
    stored = snapshot(dataset_root(s, registered, data))
    if ending == "failed":
        fail(app, job_id)
    elif ending == "cancelled":
        cancel = client.post(f"/v1/unlearning-jobs/{job_id}:cancel",
                             headers=registered.caller.headers)  # fmt: skip
        assert cancel.json()["state"] == "CANCELLED"
    else:
        drive_to_success(app, job_id)

    apply_due(db, store_for(s), s)

    assert snapshot(dataset_root(s, registered, data)) == stored
    for path, content in mine.items():
        assert Path(path).exists() == (not path.endswith(".safetensors"))
        if Path(path).exists():
            assert Path(path).read_bytes() == content
    record = get_job(client, registered, job_id)["data_deletion"]
    assert record["intermediates"]["deleted"] is True
    assert record["intermediates"]["files"] == len(WEIGHTS) + 1
    assert record["forget_data"]["deleted"] is False
    assert "without meeting its target" in record["forget_data"]["reason"]


def test_forget_data_in_use_by_another_job_waits_for_it_to_end(
    app, client, db, registered, retention_settings
):
    s = retention_settings
    data = uploaded(client, registered)
    first = submit(client, registered, forget={"dataset_id": data["id"], "ids": ["u0"]},
                   target=MET_TARGET)  # fmt: skip
    second = submit(client, registered, forget={"dataset_id": data["id"], "ids": ["u3"]})
    lay_out_workdir(s, first)
    drive_to_success(app, first)

    assert apply_due(db, store_for(s), s) == {"retention_waiting": 1}
    record = get_job(client, registered, first)["data_deletion"]
    assert record["intermediates"]["deleted"] is True and record["forget_data"]["deleted"] is False
    assert second in record["forget_data"]["reason"]
    assert (dataset_root(s, registered, data) / "img/0.png").exists()

    client.post(f"/v1/unlearning-jobs/{second}:cancel", headers=registered.caller.headers)
    assert apply_due(db, store_for(s), s) == {"retention_done": 2}
    assert not (dataset_root(s, registered, data) / "img/0.png").exists()
    assert (dataset_root(s, registered, data) / "img/3.png").exists()  # the cancelled job's
    record = get_job(client, registered, first)["data_deletion"]
    assert record["forget_data"]["deleted"] is True and record["forget_data"]["files"] == 1
    assert record["intermediates"]["files"] == len(WEIGHTS) + 1  # counted once


def test_a_data_set_registered_by_uri_is_not_ours_to_delete(
    app, client, db, registered, retention_settings, shapes_dir
):
    s = retention_settings
    before = snapshot(shapes_dir)
    job_id = submit(client, registered, target=MET_TARGET)
    drive_to_success(app, job_id)
    apply_due(db, store_for(s), s)
    assert snapshot(shapes_dir) == before
    forget = get_job(client, registered, job_id)["data_deletion"]["forget_data"]
    assert forget["deleted"] is False and "tenant's own storage" in forget["reason"]


def test_a_tenants_policy_keeps_what_it_says(
    app, client, db, registered, admin, retention_settings
):
    s = retention_settings
    shown = json.loads(admin("tenants", "retention", "acme", "--forget-data", "keep",
                             "--intermediates", "keep"))  # fmt: skip
    assert shown["policy"] == {"forget_data": "keep", "intermediates": "keep",
                               "superseded": "block"}  # fmt: skip
    data = uploaded(client, registered)
    job_id = submit(client, registered, forget={"dataset_id": data["id"], "ids": ["u0"]},
                    target=MET_TARGET)  # fmt: skip
    mine = lay_out_workdir(s, job_id)
    stored = snapshot(dataset_root(s, registered, data))
    drive_to_success(app, job_id)
    apply_due(db, store_for(s), s)
    assert snapshot(dataset_root(s, registered, data)) == stored
    assert all(Path(p).read_bytes() == c for p, c in mine.items())
    record = get_job(client, registered, job_id)["data_deletion"]
    assert not record["forget_data"]["deleted"] and not record["intermediates"]["deleted"]
    assert audit_actions(client, registered, "tenant.retention_changed")


def test_a_superseded_version_is_refused_for_download_and_as_a_base_until_an_admin_keeps_it(
    app, client, registered, admin
):
    headers = registered.caller.headers
    versions = f"/v1/models/{registered.model_id}/versions"
    assert client.get(f"{versions}/1/weights", headers=headers).status_code == 200
    drive_to_success(app, submit(client, registered))

    refused = client.get(f"{versions}/1/weights", headers=headers)
    assert refused.status_code == 410 and "superseded" in refused.json()["error"]["message"]
    one = client.get(f"{versions}/1", headers=headers).json()
    assert one["status"] == "superseded" and one["usable"] is False and one["superseded_at"]
    body = {"model": {"id": registered.model_id, "version": 1},
            "forget": {"dataset_id": registered.dataset_id, "ids": ["circle-2"]},
            "variants": {"preset": "tiny-classifier"}}  # fmt: skip
    base = client.post("/v1/unlearning-jobs", json=body, headers=headers)
    assert base.status_code == 422
    assert base.json()["error"]["fields"][0]["field"] == "model.version"
    assert "superseded" in base.json()["error"]["fields"][0]["problem"]

    admin("versions", "keep", registered.model_id, "1", "--reason", "litigation hold #12")
    kept = client.get(f"{versions}/1", headers=headers).json()
    assert kept["status"] == "kept" and kept["usable"] is True
    assert kept["kept_reason"] == "litigation hold #12" and kept["kept_by"].startswith("cli:")
    assert client.get(f"{versions}/1/weights", headers=headers).status_code == 200
    assert client.post("/v1/unlearning-jobs", json=body, headers=headers).status_code == 202
    [entry] = audit_actions(client, registered, "model.version_kept")
    assert entry["details"] == {"version": 1, "reason": "litigation hold #12"}


def test_deleting_a_data_set_leaves_a_tombstone_and_is_refused_while_a_job_uses_it(
    app, client, registered, settings
):
    headers = registered.caller.headers
    data = uploaded(client, registered)
    root = dataset_root(settings, registered, data)
    job_id = submit(client, registered, forget={"dataset_id": data["id"], "ids": ["u0"]})
    busy = client.delete(f"/v1/datasets/{data['id']}", headers=headers)
    assert busy.status_code == 409 and job_id in busy.json()["error"]["message"]
    assert root.is_dir()
    client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=headers)

    gone = client.delete(f"/v1/datasets/{data['id']}?reason=subject asked", headers=headers)
    assert gone.status_code == 200, gone.text
    assert gone.json()["deleted_at"] and gone.json()["deletion_reason"] == "subject asked"
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))
    shown = client.get(f"/v1/datasets/{data['id']}", headers=headers).json()
    assert shown["deleted_at"] and shown["content_sha256"] == data["content_sha256"]
    listed = client.get("/v1/datasets", headers=headers).json()["items"]
    assert data["id"] not in [d["id"] for d in listed]
    flagged = client.get("/v1/datasets?include_deleted=true", headers=headers).json()["items"]
    assert data["id"] in [d["id"] for d in flagged]
    refused = client.post("/v1/unlearning-jobs", headers=headers, json={
        "model": {"id": registered.model_id},
        "forget": {"dataset_id": data["id"], "ids": ["u1"]},
        "variants": {"preset": "tiny-classifier"}})  # fmt: skip
    assert refused.status_code == 422
    assert refused.json()["error"]["fields"][0]["field"] == "forget.dataset_id"
    [entry] = audit_actions(client, registered, "dataset.deleted")
    assert entry["details"]["files"] == 10 and entry["details"]["stored_by_service"] is True
    assert client.delete(f"/v1/datasets/{data['id']}", headers=headers).status_code == 200


def _stored_chain(app, registered: Registered, tmp_path: Path) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """Versions 2 and 3 of the model, as jobs store them: 2 dense in the store, 3 as a sparse
    delta on 2. Returns (version, sha256) of both."""
    settings = app.state.settings
    store = store_for(settings)
    model_id = uuid.UUID(registered.model_id)
    two = _unlearn(_model(), 2)
    three = _unlearn(two, 3)
    made = []
    parent = None
    for number, tensors in ((2, two), (3, three)):
        dense = tmp_path / f"v{number}.safetensors"
        save_file(tensors, dense, {"version": str(number)})
        sha256 = file_sha256(dense)
        uri = store_version(store, settings, model_id, dense, sha256, parent)
        if uri is None:
            key = f"models/{model_id}/{sha256}.safetensors"
            store.put_file(dense, key)
            uri = store.uri(key)
        with app.state.db.unit_of_work() as session:
            add_version(session, registered.caller.tenant_id, model_id, weights_uri=uri,
                        weights_sha256=sha256, size_bytes=dense.stat().st_size,
                        parent_version_id=None, produced_by_job_id=None, actor="test")  # fmt: skip
        parent = (uri, sha256, dense)
        made.append((number, sha256, uri))
    assert delta_key_of(store, made[1][2]) is not None  # 3 is stored as a delta on 2
    return [(n, sha) for n, sha, _ in made]


def test_deleting_a_delta_parent_keeps_its_childs_bytes_and_hash(app, client, registered, tmp_path):
    headers = registered.caller.headers
    versions = f"/v1/models/{registered.model_id}/versions"
    (_, two_sha), (_, three_sha) = _stored_chain(app, registered, tmp_path)
    store = store_for(app.state.settings)
    two_files = store.list_keys(f"models/{registered.model_id}")

    gone = client.delete(f"{versions}/2?reason=superseded, holds DSR-1", headers=headers)
    assert gone.status_code == 200, gone.text
    assert gone.json()["status"] == "deleted" and gone.json()["weights_sha256"] == two_sha

    assert client.get(f"{versions}/2/weights", headers=headers).status_code == 410
    weights = client.get(f"{versions}/3/weights", headers=headers)
    assert weights.status_code == 200
    assert hashlib.sha256(weights.content).hexdigest() == three_sha
    left = store.list_keys(f"models/{registered.model_id}")
    assert left == [f"models/{registered.model_id}/{three_sha}.safetensors"]  # 3 dense, 2 gone
    assert set(two_files) - set(left)  # version 2's bytes and 3's old delta are deleted
    listed = client.get(versions, headers=headers).json()["items"]
    assert [(v["version"], v["status"]) for v in listed] == [
        (1, "available"), (2, "deleted"), (3, "available")]  # fmt: skip
    [entry] = audit_actions(client, registered, "model.version_deleted")
    assert entry["details"]["version"] == 2 and entry["details"]["stored_by_service"] is True


def test_a_version_a_job_runs_on_cannot_be_deleted(client, registered):
    headers = registered.caller.headers
    job_id = submit(client, registered)
    busy = client.delete(f"/v1/models/{registered.model_id}/versions/1", headers=headers)
    assert busy.status_code == 409 and job_id in busy.json()["error"]["message"]


def test_policy_delete_tombstones_the_superseded_version(
    app, client, db, registered, admin, retention_settings, weights_file
):
    s = retention_settings
    admin("tenants", "retention", "acme", "--superseded", "delete")
    before = weights_file.read_bytes()
    job_id = submit(client, registered, target=MET_TARGET)
    drive_to_success(app, job_id)
    apply_due(db, store_for(s), s)
    one = client.get(f"/v1/models/{registered.model_id}/versions/1",
                     headers=registered.caller.headers).json()  # fmt: skip
    assert one["status"] == "deleted" and "superseded by version 2" in one["deletion_reason"]
    # Version 1 is the tenant's own file (registered by path): blocked, not deleted there.
    assert weights_file.read_bytes() == before
    record = get_job(client, registered, job_id)["data_deletion"]
    assert record["superseded_version"]["version"] == 1
    [entry] = audit_actions(client, registered, "model.version_deleted")
    assert entry["details"]["stored_by_service"] is False
