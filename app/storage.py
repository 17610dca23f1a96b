"""Where files are: URIs a tenant may point at, hashing them, and the artifact store.

A tenant registers weights and manifests by URI, and the server then reads them. So that a
tenant cannot make the server read any file it can reach (/etc/..., another tenant's
uploads), a URI must lie under one of the configured `data_roots` (`{tenant}` in one is the
caller's tenant id). A path outside them and a missing one get the same answer, so that no
answer tells whether a file the tenant may not read exists.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import fsspec

from app.settings import TENANT
from negmerge.io import file_sha256

_BLOCK = 8 * 1024 * 1024


class UriNotAllowed(ValueError):
    """A URI outside the configured data roots, or one that cannot be read."""


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The local path of a plain path or file:// URI, made absolute and free of '..'."""
    path = urlparse(uri).path if uri.startswith("file://") else uri
    return Path(os.path.abspath(path))


# One answer for a path outside the caller's data roots and for a missing one.
NOT_READABLE = (
    "is not under your data roots on this server (the operator's NEGMERGE_DATA_ROOTS), "
    "or does not exist"
)


def tenant_roots(roots: list[str], tenant_id: uuid.UUID) -> list[str]:
    """The data roots of one tenant: `{tenant}` replaced by its id."""
    return [root.replace(TENANT, str(tenant_id)) for root in roots]


def check_allowed(uri: str, roots: list[str], tenant_id: uuid.UUID) -> str:
    """`uri` normalised (local paths made absolute) if it lies under one of the tenant's
    `roots` (and, if local, exists); UriNotAllowed(NOT_READABLE) otherwise."""
    if "\x00" in uri:
        raise UriNotAllowed("contains a NUL character")
    roots = tenant_roots(roots, tenant_id)
    if is_local(uri):
        # resolve() follows links, so a link inside a root cannot lead out of it.
        path = local_path(uri).resolve()
        inside = any(
            is_local(root) and path.is_relative_to(local_path(root).resolve()) for root in roots
        )
        if inside and path.exists():
            return str(path)
    else:
        for root in roots:
            if not is_local(root) and uri.startswith(root.rstrip("/") + "/") and ".." not in uri:
                return uri
    raise UriNotAllowed(NOT_READABLE)


def sha256_and_size(uri: str) -> tuple[str, int]:
    """The sha256 and size of the file at `uri` (a path or any fsspec URI)."""
    if is_local(uri):
        path = local_path(uri)
        if not path.is_file():
            raise UriNotAllowed("is a folder, not a file" if path.is_dir() else NOT_READABLE)
        return file_sha256(path), path.stat().st_size
    digest, size = hashlib.sha256(), 0
    try:
        with fsspec.open(uri, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
                size += len(block)
    except (OSError, ValueError) as exc:
        raise UriNotAllowed(f"cannot be read ({exc})") from None
    return digest.hexdigest(), size
