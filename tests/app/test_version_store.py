"""Versions stored as their parent plus a sparse delta, on both backends of the store."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from pathlib import Path

import pytest

from app.artifacts import ArtifactStore, store_for
from app.settings import Settings
from app.version_store import (
    chain_depth,
    delta_key_of,
    iter_materialised,
    materialise_version,
    store_version,
)
from negmerge.io import file_sha256, save_file
from tests.negmerge.test_version_delta import _model, _unlearn


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:  # type: ignore[no-untyped-def]
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "artifacts"))
    server = request.getfixturevalue("s3_server")
    return store_for(
        Settings(
            artifact_root=server.root(f"versions-{secrets.token_hex(4)}"),
            artifact_s3_endpoint_url=server.endpoint_url,
            artifact_s3_access_key_id=server.access_key,
            artifact_s3_secret_access_key=server.secret_key,
            data_roots=[str(tmp_path / "data")],
        )
    )


def _chain(store: ArtifactStore, tmp_path: Path, count: int, depth: int) -> list[tuple]:
    """`count` versions, each unlearned from the last, stored as a job stores them: the
    first (a tenant's file) dense, then deltas where allowed. (uri, sha256, dense file)."""
    settings = Settings(version_delta_max_depth=depth, data_roots=[str(tmp_path)])
    model_id = uuid.uuid4()
    tensors = _model()
    first = tmp_path / "tenant" / "v1.safetensors"
    first.parent.mkdir()
    save_file(tensors, first, {"version": "1"})
    versions = [(str(first), file_sha256(first), first)]
    for n in range(2, count + 1):
        tensors = _unlearn(tensors, n)
        dense = tmp_path / f"v{n}.safetensors"
        save_file(tensors, dense, {"version": str(n)})
        sha256 = file_sha256(dense)
        uri = store_version(store, settings, model_id, dense, sha256, versions[-1])
        if uri is None:  # dense, as worker.tasks.store_model writes it
            key = f"models/{model_id}/{sha256}.safetensors"
            store.put_file(dense, key)
            uri = store.uri(key)
        versions.append((uri, sha256, dense))
    return versions


def _bytes_of(store: ArtifactStore, uri: str, sha256: str, scratch: Path) -> bytes:
    key = delta_key_of(store, uri)
    if key is None:
        return b"".join(store.iter_verified(store.key_of(uri)))
    return b"".join(iter_materialised(store, key, sha256, str(scratch)))


def test_a_chain_of_five_deltas_materialises_to_the_dense_files(store, tmp_path):
    versions = _chain(store, tmp_path, 7, depth=8)
    # v1 is the tenant's file, v2 dense (its parent is not in the store), v3..v7 deltas.
    assert [delta_key_of(store, uri) is not None for uri, _, _ in versions[1:]] == [
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert chain_depth(store, delta_key_of(store, versions[-1][0])) == 5
    for uri, sha256, dense in versions[1:]:
        got = _bytes_of(store, uri, sha256, tmp_path / "scratch")
        assert hashlib.sha256(got).hexdigest() == sha256 == file_sha256(dense)
        assert got == dense.read_bytes()
    target = tmp_path / "base" / "v7.safetensors"
    materialise_version(
        store,
        delta_key_of(store, versions[-1][0]),
        versions[-1][1],
        target,
        str(tmp_path / "scratch"),
    )
    assert file_sha256(target) == versions[-1][1]
    assert not list((tmp_path / "scratch").iterdir())  # the chain's copies are gone


def test_chains_are_compacted_past_the_depth_and_keep_their_hashes(store, tmp_path):
    versions = _chain(store, tmp_path, 9, depth=2)
    # v2 dense; v3, v4 deltas (depth 1, 2); v5 dense again; v6, v7 deltas; v8 dense; v9 delta.
    kinds = [delta_key_of(store, uri) is not None for uri, _, _ in versions[1:]]
    assert kinds == [False, True, True, False, True, True, False, True]
    depths = [chain_depth(store, store.key_of(uri)) for uri, _, _ in versions[1:]]
    assert depths == [0, 1, 2, 0, 1, 2, 0, 1]
    for uri, sha256, _ in versions[1:]:
        assert hashlib.sha256(_bytes_of(store, uri, sha256, tmp_path / "s")).hexdigest() == sha256


def test_depth_zero_stores_every_version_dense(store, tmp_path):
    versions = _chain(store, tmp_path, 4, depth=0)
    assert all(delta_key_of(store, uri) is None for uri, _, _ in versions)


def test_a_corrupted_delta_is_refused(store, tmp_path):
    versions = _chain(store, tmp_path, 3, depth=4)
    key = delta_key_of(store, versions[-1][0])
    store.fs.pipe_file(store._path(key), b"not the delta")
    with pytest.raises(Exception, match="corrupted"):
        _bytes_of(store, versions[-1][0], versions[-1][1], tmp_path / "s")
