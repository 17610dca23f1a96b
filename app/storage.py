"""Where files are: URIs a tenant may point at, hashing them, and the artifact store.

A tenant registers weights and manifests by URI, and the server then reads them. So that a
tenant cannot make the server read any file it can reach (/etc/..., another tenant's
uploads), a URI must lie under one of the configured `data_roots`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

import fsspec

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


def check_allowed(uri: str, roots: list[str]) -> str:
    """`uri` normalised (local paths made absolute) if it lies under one of `roots`."""
    if "\x00" in uri:
        raise UriNotAllowed("contains a NUL character")
    if is_local(uri):
        # resolve() follows links, so a link inside a root cannot lead out of it.
        path = local_path(uri).resolve()
        for root in roots:
            if is_local(root) and path.is_relative_to(local_path(root).resolve()):
                return str(path)
    else:
        for root in roots:
            if not is_local(root) and uri.startswith(root.rstrip("/") + "/") and ".." not in uri:
                return uri
    raise UriNotAllowed("is not under a data root this server reads from (see data_roots)")


def sha256_and_size(uri: str) -> tuple[str, int]:
    """The sha256 and size of the file at `uri` (a path or any fsspec URI)."""
    if is_local(uri):
        path = local_path(uri)
        if not path.is_file():
            raise UriNotAllowed("no such file")
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
