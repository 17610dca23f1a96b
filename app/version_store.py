"""Model versions in the artifact store, dense or as their parent plus a sparse delta.

A job's unlearned model is stored at models/<model id>/<sha256>.safetensors (dense) or
models/<model id>/<sha256>.delta.safetensors (negmerge.version_delta: the XOR with its parent,
sparse), whichever is smaller, the delta only when its parent is a version stored here too
and the chain of deltas stays within NEGMERGE_VERSION_DELTA_MAX_DEPTH. A delta's metadata
names its parent's key and sha256, so a chain is resolved from the store alone. The sha256 a
user sees is always the dense file's; downloads and jobs get the dense bytes, materialised
one tensor slice at a time and checked against that sha256.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from app.artifacts import ArtifactStore
from app.settings import Settings
from negmerge.errors import CheckpointError
from negmerge.io import file_sha256
from negmerge.version_delta import DenseReader, materialise, materialise_to, write_delta

DELTA_SUFFIX = ".delta.safetensors"
_MAX_CHAIN = 64  # the setting's bound: a longer chain (or a loop) is a corrupted store


def is_delta_key(key: str | None) -> bool:
    """Whether `key` names a version stored as a delta (server-written keys only)."""
    return key is not None and key.startswith("models/") and key.endswith(DELTA_SUFFIX)


def delta_key_of(store: ArtifactStore, uri: str) -> str | None:
    """The key of the delta-stored version at `uri`, or None if it is stored dense."""
    key = store.key_of(uri)
    return key if is_delta_key(key) else None


def _read_metadata(store: ArtifactStore, key: str) -> dict[str, str]:
    with store.open(key) as f:
        return DenseReader(f, store.uri(key)).metadata


def chain_depth(store: ArtifactStore, key: str) -> int:
    """How many deltas stand on the dense version under the version stored as `key`."""
    return int(_read_metadata(store, key)["delta_depth"]) if is_delta_key(key) else 0


def store_version(
    store: ArtifactStore,
    settings: Settings,
    model_id: uuid.UUID,
    source: Path,
    sha256: str,
    parent: tuple[str, str, Path] | None,
) -> str | None:
    """Store `source` (sha256 `sha256`) as a delta on `parent` (its URI, sha256 and a local
    dense copy) when that is allowed and smaller; returns its URI, or None: store it dense."""
    if parent is None or settings.version_delta_max_depth == 0:
        return None
    parent_uri, parent_sha256, parent_local = parent
    parent_key = store.key_of(parent_uri)
    # Only on a version this service stored: a tenant's own file may change or go away.
    if parent_key is None or not parent_key.startswith("models/"):
        return None
    depth = chain_depth(store, parent_key) + 1
    if depth > settings.version_delta_max_depth:
        return None  # compaction: this version starts a new chain, dense
    key = f"models/{model_id}/{sha256}{DELTA_SUFFIX}"
    if store.exists(key):
        return store.uri(key)
    if file_sha256(parent_local) != parent_sha256:
        raise CheckpointError(f"{parent_local}: not the parent version's weights")
    output = source.with_name(f".{sha256}.{uuid.uuid4().hex[:8]}{DELTA_SUFFIX}")
    try:
        extra = {"delta_parent": parent_key}
        written = write_delta(
            parent_local,
            source,
            output,
            parent_sha256=parent_sha256,
            child_sha256=sha256,
            depth=depth,
            extra_metadata=extra,
        )
        if not written or output.stat().st_size >= source.stat().st_size:
            return None
        store.put_file(output, key)
    finally:
        output.unlink(missing_ok=True)
    return store.uri(key)


@contextlib.contextmanager
def _chain(store: ArtifactStore, key: str, scratch: str) -> Iterator[tuple[DenseReader, list]]:
    """The dense version under delta `key` opened for ranged reads, and the chain's deltas
    copied (checked against their recorded sha256) into a temporary folder, oldest first."""
    Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="chain-") as folder:
        deltas: list[Path] = []
        while is_delta_key(key):
            if len(deltas) == _MAX_CHAIN:
                raise CheckpointError(f"{store.uri(key)}: a chain of more than {_MAX_CHAIN}")
            local = Path(folder) / f"{len(deltas)}{DELTA_SUFFIX}"
            store.get_file(key, local)
            deltas.append(local)
            with open(local, "rb") as f:
                key = DenseReader(f, str(local)).metadata["delta_parent"]
        with store.open(key) as base:
            yield DenseReader(base, store.uri(key)), deltas[::-1]


def iter_materialised(store: ArtifactStore, key: str, sha256: str, scratch: str) -> Iterator[bytes]:
    """The dense bytes of the version stored as delta `key`, block by block; an error after
    the last block if they do not hash to `sha256`."""
    with _chain(store, key, scratch) as (base, deltas):
        yield from materialise(base, deltas, sha256)


def materialise_version(
    store: ArtifactStore, key: str, sha256: str, target: Path, scratch: str
) -> None:
    """The version stored as delta `key` as a dense local file `target` (kept if it is there
    already with the right sha256)."""
    if target.is_file() and file_sha256(target) == sha256:
        return
    with _chain(store, key, scratch) as (base, deltas):
        materialise_to(base, deltas, sha256, target)


def chain_keys(store: ArtifactStore, key: str) -> list[str]:
    """The keys the version stored as `key` is made of: itself, then each delta's parent
    down to the dense version."""
    keys = [key]
    while is_delta_key(key):
        if len(keys) > _MAX_CHAIN:
            raise CheckpointError(f"{store.uri(key)}: a chain of more than {_MAX_CHAIN}")
        key = _read_metadata(store, key)["delta_parent"]
        keys.append(key)
    return keys


def make_dense(
    store: ArtifactStore, model_id: uuid.UUID, key: str, sha256: str, scratch: str
) -> str:
    """Store the version held as delta `key` dense (models/<model id>/<sha256>.safetensors),
    so that it no longer needs its parents (one of them is being deleted); returns its URI."""
    dense = f"models/{model_id}/{sha256}.safetensors"
    if store.exists(dense) and store.recorded_sha256(dense) == sha256:
        return store.uri(dense)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="dense-") as folder:
        local = Path(folder) / f"{sha256}.safetensors"
        materialise_version(store, key, sha256, local, scratch)
        store.put_file(local, dense)
    return store.uri(dense)
