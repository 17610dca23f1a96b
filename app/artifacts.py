"""The artifact store: what the service writes (uploads, task vectors, merged vectors,
unlearned models, reports), under `artifact_root`, a local path or an s3:// URI.

One interface over fsspec for both. Every object is written with a sidecar object
`<key>.sha256` holding its sha256, written after the object; every read through the store
hashes the bytes and compares them with the sidecar, so a missing or corrupted object is an
ArtifactError naming the object instead of wrong weights. On the local backend an object
appears atomically (written beside it, then renamed); on S3 a PUT is atomic already.

The s3 endpoint and credentials also become fsspec's defaults for s3:// in this process, so
that the library (negmerge.data reading an uploaded data set's images) reaches the same
store without being told about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import fsspec

from app.settings import Settings
from negmerge.errors import NegMergeError

_BLOCK = 8 * 1024 * 1024
SIDECAR = ".sha256"


class ArtifactError(NegMergeError):
    """An object of the store is missing or does not match its recorded sha256."""


class ArtifactMissing(ArtifactError):
    pass


class ArtifactCorrupted(ArtifactError):
    pass


def is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def s3_options(settings: Settings) -> dict:
    """s3fs's options for the configured endpoint and credentials (the unset ones left to
    s3fs's own defaults: AWS_* variables, instance roles)."""
    options: dict = {}
    if settings.artifact_s3_endpoint_url:
        options["endpoint_url"] = settings.artifact_s3_endpoint_url
    if settings.artifact_s3_access_key_id:
        options["key"] = settings.artifact_s3_access_key_id
    if settings.artifact_s3_secret_access_key:
        options["secret"] = settings.artifact_s3_secret_access_key.get_secret_value()
    if settings.artifact_s3_region:
        options["client_kwargs"] = {"region_name": settings.artifact_s3_region}
    return options


class ArtifactStore:
    """Objects by key ("jobs/<id>/merged.safetensors") under one root."""

    def __init__(self, root: str, storage_options: dict | None = None) -> None:
        self.remote = is_remote(root)
        if not self.remote:
            root = os.path.abspath(root.removeprefix("file://"))
        self.root = root.rstrip("/")
        self._options = storage_options or {}
        fs, base = fsspec.core.url_to_fs(self.root, **self._options)
        self._protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._base = base.rstrip("/")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # Looked up on each use: fsspec keeps one instance per process, and a forked worker
        # child must not use its parent's (its event loop and connections stay behind).
        return fsspec.filesystem(self._protocol, **self._options)

    # ---- names -------------------------------------------------------------------------

    def uri(self, key: str) -> str:
        """The object's URI (a local path on the local backend)."""
        return f"{self.root}/{key}"

    def key_of(self, uri: str) -> str | None:
        """The key of `uri` if it names an object of this store, else None."""
        if not self.remote:
            uri = os.path.abspath(uri.removeprefix("file://"))
        prefix = self.root + "/"
        if not uri.startswith(prefix) or ".." in uri.split("/"):
            return None
        return uri[len(prefix) :]

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not an object key: {key!r}")
        return f"{self._base}/{key}"

    # ---- writing -----------------------------------------------------------------------

    def put_file(self, source: str | os.PathLike, key: str) -> str:
        """Store the local file `source` as `key`; returns its sha256 (also recorded)."""
        sha256 = _file_sha256(source)
        path = self._path(key)
        if self.remote:
            self.fs.put_file(str(source), path)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.put_file(str(source), tmp)
            os.replace(tmp, path)
        self._write_sidecar(key, sha256)
        return sha256

    def put_tree(self, folder: str | os.PathLike, prefix: str) -> int:
        """Store every file under local `folder` as `prefix/<relative path>`; returns bytes."""
        files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
        keys = [f"{prefix}/{path.relative_to(folder).as_posix()}" for path in files]
        if not self.remote:
            for path, key in zip(files, keys, strict=True):
                self.put_file(path, key)
        elif files:  # s3fs sends a batch concurrently: thousands of small images in seconds
            self.fs.put([str(p) for p in files], [self._path(k) for k in keys])
            self.fs.pipe(
                {
                    self._path(key + SIDECAR): _file_sha256(path).encode()
                    for path, key in zip(files, keys, strict=True)
                }
            )
        return sum(path.stat().st_size for path in files)

    def _write_sidecar(self, key: str, sha256: str) -> None:
        path = self._path(key + SIDECAR)
        if self.remote:
            self.fs.pipe_file(path, sha256.encode())
        else:
            tmp = Path(f"{path}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(sha256)
            os.replace(tmp, path)

    # ---- reading -----------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether `key` and its recorded sha256 are both there (a write that finished)."""
        return self.fs.exists(self._path(key + SIDECAR)) and self.fs.exists(self._path(key))

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self._path(key)))
        except FileNotFoundError:
            raise self._missing(key) from None

    def recorded_sha256(self, key: str) -> str:
        """The sha256 recorded when `key` was written."""
        try:
            return self.fs.cat_file(self._path(key + SIDECAR)).decode().strip()
        except FileNotFoundError:
            raise self._missing(key) from None

    def get_file(self, key: str, target: str | os.PathLike) -> str:
        """Copy `key` to the local file `target`, checked against its recorded sha256
        (ArtifactCorrupted, and no `target`, if it does not match); returns the sha256."""
        expected = self.recorded_sha256(key)
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as out:
                for block in self.iter_verified(key, expected):
                    out.write(block)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return expected

    def iter_verified(self, key: str, expected: str | None = None) -> Iterator[bytes]:
        """The object's bytes in blocks; ArtifactCorrupted after the last block if they do
        not hash to the recorded sha256 (a reader streaming them on must drop what it got)."""
        expected = expected or self.recorded_sha256(key)
        digest = hashlib.sha256()
        try:
            with self.fs.open(self._path(key), "rb", block_size=_BLOCK) as f:
                while block := f.read(_BLOCK):
                    digest.update(block)
                    yield block
        except FileNotFoundError:
            raise self._missing(key) from None
        if digest.hexdigest() != expected:
            raise ArtifactCorrupted(
                f"artifact {self.uri(key)} is corrupted: its sha256 is {digest.hexdigest()}, "
                f"{expected} was recorded when it was written"
            )

    def list_keys(self, prefix: str) -> list[str]:
        """The keys of the objects under `prefix` (not their sha256 sidecars), sorted."""
        base = self._path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        start = len(self._base) + 1
        return sorted(
            path[start:]
            for path in found
            if path.startswith(self._base + "/") and not path.endswith((SIDECAR, ".tmp"))
        )

    def open(self, key: str) -> BinaryIO:
        """The object opened for ranged reads (not checked against its sha256: a caller
        that reads only parts of it checks what it makes of them)."""
        try:
            return self.fs.open(self._path(key), "rb", block_size=_BLOCK)
        except FileNotFoundError:
            raise self._missing(key) from None

    def _missing(self, key: str) -> ArtifactMissing:
        return ArtifactMissing(
            f"artifact {self.uri(key)} is missing from the artifact store (or its recorded "
            "sha256 is: a write that did not finish)"
        )

    def presigned_url(self, key: str, expires_seconds: int) -> str:
        """A URL that reads `key` without credentials for `expires_seconds` (S3 only)."""
        if not self.remote:
            raise ValueError("presigned URLs need an object store")
        return self.fs.url(self._path(key), expires=expires_seconds)

    # ---- deleting ----------------------------------------------------------------------

    def delete(self, key: str) -> None:
        for path in (self._path(key), self._path(key + SIDECAR)):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


def _file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def store_for(settings: Settings) -> ArtifactStore:
    """The artifact store of `settings`; for s3://, its endpoint and credentials become
    fsspec's s3 defaults in this process too (see the module's docstring)."""
    if settings.artifact_root.startswith("s3://"):
        fsspec.config.conf.setdefault("s3", {}).update(s3_options(settings))
    return ArtifactStore(settings.artifact_root)
