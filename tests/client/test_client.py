"""negmerge_client.ServiceClient against a real service over HTTP (uvicorn in a thread). No
workers run here, so jobs stay QUEUED unless they are cancelled."""

from __future__ import annotations

import hashlib
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from negmerge_client import ServiceClient, ServiceError
from tests.app.conftest import CLASSES, model_body, write_dataset
from tests.client.live_service import free_port


@pytest.fixture
def service(service_url, caller):  # type: ignore[no-untyped-def]
    with ServiceClient(service_url, caller.key, timeout=10) as client:
        yield client


@pytest.fixture
def registered(service, weights_file, shapes_dir):  # type: ignore[no-untyped-def]
    model = service.register_model(model_body(weights_file))
    dataset = service.register_dataset("shapes", str(shapes_dir / "manifest.jsonl"))
    return model, dataset


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def zip_dataset(folder: Path) -> Path:
    """A zip archive of a tiny data set (manifest.jsonl and PNGs)."""
    write_dataset(folder / "tree")
    archive = folder / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((folder / "tree").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder / "tree").as_posix())
    return archive


def job_body(model: dict, dataset: dict, **changes: object) -> dict:
    body = {
        "model": {"id": model["id"]},
        "forget": {"dataset_id": dataset["id"], "classes": ["circle"]},
        "variants": {"preset": "tiny-classifier"},
        "subject_reference": "DSR-7",
        "allow_repeat": True,  # one forget set many times; refusing repeats: tests/app/api
    }
    return {**body, **changes}


def test_models_register_list_versions(service, registered, weights_file):
    model, _ = registered
    assert model["latest_version"] == 1
    assert [m["id"] for m in service.list_models()] == [model["id"]]
    assert service.get_model(model["id"])["classes"] == CLASSES
    (version,) = service.model_versions(model["id"])
    assert version["version"] == 1
    assert version["weights_sha256"] == sha256_of(weights_file)


def test_download_writes_the_weights_and_checks_their_sha256(service, registered, tmp_path):
    model, _ = registered
    progress: list[tuple[int, int | None]] = []
    path = service.download_model_version(
        model["id"], 1, tmp_path, on_progress=lambda done, total: progress.append((done, total))
    )
    assert path == tmp_path / f"{model['id']}-v1.safetensors"
    assert sha256_of(path) == service.model_versions(model["id"])[0]["weights_sha256"]
    assert progress and progress[-1][0] == path.stat().st_size
    assert list(tmp_path.iterdir()) == [path]  # no partial file left


def test_download_refuses_weights_that_do_not_match_the_reported_sha256(
    service, weights_file, data_root, tmp_path
):
    # The server serves the registered file as it is now; changed after registration, its
    # bytes no longer match the sha256 recorded (and reported) at registration.
    weights = data_root / "weights" / f"tampered-{tmp_path.name}.safetensors"
    shutil.copy(weights_file, weights)
    model = service.register_model(model_body(weights, name="tampered"))
    with weights.open("ab") as f:
        f.write(b"\0")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ServiceError) as caught:
        service.download_model_version(model["id"], 1, out / "w.safetensors")
    assert caught.value.code == "checksum_mismatch"
    assert "sha256" in str(caught.value) and "\n" not in str(caught.value)
    assert list(out.iterdir()) == []
    weights.unlink()


def test_datasets_register_and_upload(service, registered, tmp_path):
    model, dataset = registered
    assert dataset["sample_count"] == 18 and dataset["source"] == "uri"
    uploaded = service.upload_dataset(zip_dataset(tmp_path), "uploaded", model_id=model["id"])
    assert uploaded["source"] == "upload" and uploaded["sample_count"] == 18
    assert uploaded["archive_sha256"] == sha256_of(tmp_path / "shapes.zip")
    assert {d["id"] for d in service.list_datasets()} == {dataset["id"], uploaded["id"]}
    assert service.get_dataset(uploaded["id"])["labels"] == CLASSES


def test_jobs_submit_get_list_cancel_report(service, registered):
    model, dataset = registered
    job = service.submit_job(job_body(model, dataset), idempotency_key="k-1")
    assert job["state"] == "QUEUED" and job["forget"]["count"] == 6
    assert service.submit_job(job_body(model, dataset), idempotency_key="k-1")["id"] == job["id"]
    others = [service.submit_job(job_body(model, dataset))["id"] for _ in range(2)]
    assert service.get_job(job["id"])["subject_reference"] == "DSR-7"
    # page_size=1: three pages, followed by the iterator
    assert [j["id"] for j in service.list_jobs(page_size=1)] == [*reversed(others), job["id"]]
    assert service.cancel_job(job["id"])["state"] == "CANCELLED"
    assert [j["id"] for j in service.list_jobs("CANCELLED")] == [job["id"]]
    assert len(list(service.list_jobs(["QUEUED", "CANCELLED"], model_id=model["id"]))) == 3
    report = service.job_report(job["id"])
    assert report["final"] is True and report["state"] == "CANCELLED"
    assert report["forget_selection"]["classes"] == ["circle"]
    assert [e["state"] for e in report["timeline"]][-1] == "CANCELLED"
    with pytest.raises(ServiceError) as caught:
        service.cancel_job(job["id"])
    assert caught.value.status == 409


def test_wait_follows_the_job_until_it_ends(service, registered):
    model, dataset = registered
    job = service.submit_job(job_body(model, dataset))
    seen: list[str] = []
    # cancelled by someone else while we wait; Retry-After (1 s) paces the polls
    canceller = threading.Timer(1.5, service.cancel_job, args=(job["id"],))
    canceller.start()
    try:
        ended = service.wait_for_job(job["id"], on_update=lambda j: seen.append(j["state"]))
    finally:
        canceller.join()
    assert ended["state"] == "CANCELLED"
    assert seen[0] == "QUEUED" and seen[-1] == "CANCELLED"
    assert 2 <= len(seen) <= 4  # about one poll a second, not a busy loop


def test_wait_gives_up_after_its_timeout(service, registered):
    model, dataset = registered
    job = service.submit_job(job_body(model, dataset))
    with pytest.raises(ServiceError) as caught:
        service.wait_for_job(job["id"], timeout=0.3)
    assert caught.value.code == "timeout" and "QUEUED" in str(caught.value)


def test_errors_are_one_readable_line(service, registered):
    model, dataset = registered
    with pytest.raises(ServiceError) as caught:
        service.submit_job(
            job_body(model, dataset, forget={"dataset_id": dataset["id"], "classes": ["x"]})
        )
    error = caught.value
    assert (error.status, error.code) == (422, "invalid_request")
    assert str(error).startswith("422 invalid_request: forget.classes") and "'x'" in str(error)
    assert error.fields[0]["field"] == "forget.classes"

    with pytest.raises(ServiceError) as caught:
        service.get_job("00000000-0000-0000-0000-000000000000")
    assert str(caught.value).startswith("404 not_found: ")

    with (
        ServiceClient(service.base_url, "nmk_not-a-key") as stranger,
        pytest.raises(ServiceError) as caught,
    ):
        list(stranger.list_jobs())
    assert caught.value.status == 401 and str(caught.value).startswith("401 unauthenticated: ")


def test_a_service_that_is_down_is_named_in_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    with ServiceClient(url, "nmk_x", timeout=2) as down, pytest.raises(ServiceError) as caught:
        down.get_job("00000000-0000-0000-0000-000000000000")
    message = str(caught.value)
    assert caught.value.code == "unreachable" and caught.value.status == 0
    assert url in message and "connection refused" in message and "\n" not in message


def test_health_says_whether_the_service_is_ready(service):
    health = service.health()
    assert health["status"] == "ok" and health["checks"]["database"] == "ok"
