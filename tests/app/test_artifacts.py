"""The artifact store on both backends: a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import secrets
import urllib.request

import pytest

from app.artifacts import ArtifactCorrupted, ArtifactMissing, ArtifactStore, store_for
from app.settings import Settings


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:  # type: ignore[no-untyped-def]
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "artifacts"))
    server = request.getfixturevalue("s3_server")
    settings = Settings(
        artifact_root=server.root(f"unit-{secrets.token_hex(4)}"),
        artifact_s3_endpoint_url=server.endpoint_url,
        artifact_s3_access_key_id=server.access_key,
        artifact_s3_secret_access_key=server.secret_key,
        data_roots=[str(tmp_path / "data")],
    )
    return store_for(settings)


def _file(tmp_path, data: bytes):  # type: ignore[no-untyped-def]
    path = tmp_path / f"source-{secrets.token_hex(3)}.bin"
    path.write_bytes(data)
    return path


def test_an_object_round_trips_with_its_recorded_sha256(store, tmp_path):
    data = secrets.token_bytes(3 * 1024 * 1024 + 7)
    sha256 = store.put_file(_file(tmp_path, data), "jobs/j1/merged.safetensors")
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert store.exists("jobs/j1/merged.safetensors")
    assert store.recorded_sha256("jobs/j1/merged.safetensors") == sha256
    assert store.size("jobs/j1/merged.safetensors") == len(data)

    target = tmp_path / "back" / "merged.safetensors"
    assert store.get_file("jobs/j1/merged.safetensors", target) == sha256
    assert target.read_bytes() == data
    assert b"".join(store.iter_verified("jobs/j1/merged.safetensors")) == data
    assert store.key_of(store.uri("jobs/j1/merged.safetensors")) == "jobs/j1/merged.safetensors"
    assert store.key_of("/elsewhere/jobs/j1") is None


def test_a_corrupted_object_is_refused_and_nothing_is_written(store, tmp_path):
    store.put_file(_file(tmp_path, b"the real bytes" * 1000), "models/m/a.safetensors")
    # Someone (a disk, a bad copy) changes the object behind the store's back.
    store.fs.pipe_file(store._path("models/m/a.safetensors"), b"other bytes" * 1000)
    target = tmp_path / "a.safetensors"
    with pytest.raises(ArtifactCorrupted, match=r"models/m/a\.safetensors is corrupted"):
        store.get_file("models/m/a.safetensors", target)
    assert not target.exists()
    assert not list(tmp_path.glob(".a.safetensors.*"))  # no partial file left behind
    with pytest.raises(ArtifactCorrupted):
        b"".join(store.iter_verified("models/m/a.safetensors"))


def test_a_missing_object_is_a_clear_error(store, tmp_path):
    with pytest.raises(ArtifactMissing, match=r"jobs/none/base\.safetensors is missing"):
        store.get_file("jobs/none/base.safetensors", tmp_path / "base.safetensors")
    # An object whose write stopped before its sha256 was recorded counts as missing.
    store.fs.makedirs(store._path("jobs/half"), exist_ok=True)
    store.fs.pipe_file(store._path("jobs/half/base.safetensors"), b"partial")
    assert not store.exists("jobs/half/base.safetensors")
    with pytest.raises(ArtifactMissing):
        store.get_file("jobs/half/base.safetensors", tmp_path / "base.safetensors")
    # And one deleted after it was written.
    store.put_file(_file(tmp_path, b"x"), "jobs/gone/x")
    store.fs.rm_file(store._path("jobs/gone/x"))
    with pytest.raises(ArtifactMissing):
        store.get_file("jobs/gone/x", tmp_path / "x")


def test_trees_and_prefixes_are_stored_and_deleted_whole(store, tmp_path):
    folder = tmp_path / "upload"
    (folder / "img").mkdir(parents=True)
    (folder / "manifest.jsonl").write_text('{"id": "a"}\n')
    (folder / "img" / "a.png").write_bytes(b"png")
    assert store.put_tree(folder, "datasets/t/d") == len('{"id": "a"}\n') + 3
    assert store.exists("datasets/t/d/img/a.png") and store.exists("datasets/t/d/manifest.jsonl")
    store.delete("datasets/t/d/img/a.png")
    assert not store.exists("datasets/t/d/img/a.png")
    store.delete_prefix("datasets/t/d")
    assert not store.exists("datasets/t/d/manifest.jsonl")
    with pytest.raises(ValueError, match="not an object key"):
        store.put_file(folder / "manifest.jsonl", "../outside")


def test_a_presigned_url_reads_the_object_without_credentials(s3_server, tmp_path):
    settings = Settings(
        artifact_root=s3_server.root("presign"),
        artifact_s3_endpoint_url=s3_server.endpoint_url,
        artifact_s3_access_key_id=s3_server.access_key,
        artifact_s3_secret_access_key=s3_server.secret_key,
        data_roots=[str(tmp_path / "data")],
    )
    store = store_for(settings)
    store.put_file(_file(tmp_path, b"weights"), "models/m/w.safetensors")
    url = store.presigned_url("models/m/w.safetensors", 60)
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        assert response.read() == b"weights"
