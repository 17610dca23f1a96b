"""Registering data sets: from a manifest URI, or from an uploaded archive.

Either way the data set is validated before anything is stored: unique ids, paths inside
the root, labels in the model's classes (when a model is named), every image within the
pixel limit (read from its header) and then decoded. An upload's files are unpacked into a
scratch folder (within the archive limits, see archives.py) and moved into the artifact
store only once they pass; an upload may hold only the manifest and the images it lists
(operating systems' metadata files are dropped, anything else is refused). If the request
then rolls back, the files are removed again. A tenant has at most
`max_concurrent_uploads` uploads being checked at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
from PIL import Image
from sqlalchemy.orm import Session

from app.artifacts import ArtifactStore, store_for
from app.auth import Principal
from app.db.models import Dataset
from app.db.repositories import DatasetRepository, ModelRepository
from app.db.session import after_rollback
from app.errors import InvalidRequest, ServiceUnavailable, TooManyRequests
from app.schemas.datasets import DatasetCreate
from app.services import audit, quotas
from app.services.archives import ArchiveError, ArchiveLimits, extract_archive
from app.services.upload_slots import upload_slot
from app.settings import Settings
from app.storage import UriNotAllowed, check_allowed, local_path
from negmerge.data import IMAGE_SUFFIXES, MANIFEST_NAMES, Manifest
from negmerge.errors import DataError


@dataclass(frozen=True)
class Validated:
    manifest: Manifest
    content_sha256: str
    split_counts: dict[str, int]


def validate_manifest(
    manifest: Manifest, settings: Settings, classes: list[str] | None, field: str
) -> Validated:
    """Check a loaded manifest's size, labels and images; hash its content."""
    if not manifest.samples:
        raise InvalidRequest(field, "the data set has no samples")
    if len(manifest.samples) > settings.max_dataset_samples:
        raise InvalidRequest(
            field, f"{len(manifest.samples)} samples, more than {settings.max_dataset_samples}"
        )
    try:
        if classes is not None:
            manifest.check_labels(classes)
        digest = hashlib.sha256()
        for sample in sorted(manifest.samples, key=lambda s: s.id):
            image_digest = image_sha256(manifest, sample, settings.max_image_pixels)
            row = [sample.id, sample.path, sample.label, sample.split, image_digest]
            digest.update(json.dumps(row).encode() + b"\n")
    except DataError as exc:
        raise InvalidRequest(field, str(exc)) from None
    splits = Counter(sample.split for sample in manifest.samples)
    return Validated(manifest, digest.hexdigest(), dict(splits))


def image_sha256(manifest: Manifest, sample, max_pixels: int) -> str:  # type: ignore[no-untyped-def]
    """Check the sample's image size from its header, decode it (the library's checks and
    messages) and hash its bytes."""
    try:
        manifest.open(sample, max_pixels=max_pixels)
    except Image.DecompressionBombError:
        raise DataError(f"sample {sample.id!r}: image has too many pixels") from None
    with fsspec.open(f"{manifest.root.rstrip('/')}/{sample.path}", "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _model_classes(session: Session, principal: Principal, model_id: uuid.UUID | None):  # type: ignore[no-untyped-def]
    if model_id is None:
        return None
    model = ModelRepository(session, principal.tenant_id).get(model_id)
    if model is None:
        raise InvalidRequest("model_id", "no such model")
    return list(model.classes)


def register_from_uri(
    session: Session, principal: Principal, body: DatasetCreate, settings: Settings
) -> Dataset:
    classes = _model_classes(session, principal, body.model_id)
    tenant = principal.tenant_id
    manifest_uri = _allowed(body.manifest_uri, settings, tenant, "manifest_uri")
    root_uri = _allowed(body.root_uri, settings, tenant, "root_uri") if body.root_uri else None
    try:
        manifest = Manifest.load(manifest_uri, root_uri)
    except DataError as exc:
        raise InvalidRequest("manifest_uri", str(exc)) from None
    if root_uri is None:  # the default root (beside the manifest) must be allowed too
        _allowed(manifest.root, settings, tenant, "root_uri")
    checked = validate_manifest(manifest, settings, classes, "manifest_uri")
    return _add(session, principal, body.name, "uri", checked, manifest.source, manifest.root, None)


def _allowed(uri: str, settings: Settings, tenant_id: uuid.UUID, field: str) -> str:
    try:
        return check_allowed(uri, settings.data_roots, tenant_id)
    except UriNotAllowed as exc:
        raise InvalidRequest(field, str(exc)) from None


def register_upload(
    session: Session,
    principal: Principal,
    name: str,
    upload: BinaryIO,
    model_id: uuid.UUID | None,
    settings: Settings,
) -> Dataset:
    """Unpack, validate and store an uploaded archive (zip or tar with a manifest)."""
    classes = _model_classes(session, principal, model_id)
    limit = settings.max_concurrent_uploads
    with upload_slot(session, principal.tenant_id, limit) as taken:
        if not taken:
            raise TooManyRequests(
                f"this tenant already has {limit} uploads being checked, the limit "
                "(max_concurrent_uploads); retry when one has finished",
                settings.upload_retry_after_seconds,
            )
        return _unpack_and_add(session, principal, name, upload, classes, settings)


def _unpack_and_add(
    session: Session,
    principal: Principal,
    name: str,
    upload: BinaryIO,
    classes: list[str] | None,
    settings: Settings,
) -> Dataset:
    store = store_for(settings)
    # Unpacked and checked on a local disk: beside the stored data sets on a local artifact
    # root (so that moving them in is a rename), in the scratch folder with an object store.
    local_root = local_path(settings.scratch_root if store.remote else settings.artifact_root)
    scratch = local_root / ("uploads" if store.remote else "tmp") / uuid.uuid4().hex
    scratch.mkdir(parents=True)
    try:
        archive = scratch / "upload"
        with open(archive, "wb") as out:
            shutil.copyfileobj(upload, out, 1024 * 1024)
        with open(archive, "rb") as f:
            archive_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        unpacked = scratch / "data"
        limits = ArchiveLimits(
            settings.max_extracted_bytes,
            settings.max_archive_members,
            settings.max_compression_ratio,
            settings.max_decompressor_memory_bytes,
        )
        try:
            extract_archive(archive, unpacked, limits)
        except ArchiveError as exc:
            raise InvalidRequest("file", str(exc).removeprefix("file: ")) from None
        archive.unlink()
        _drop_os_metadata(unpacked)
        root = _data_root(unpacked)
        _check_manifest_size(root, settings.max_manifest_bytes)
        try:
            manifest = Manifest.load(str(root))
        except DataError as exc:
            raise InvalidRequest("file", _relative(str(exc), unpacked)) from None
        _refuse_unlisted_files(unpacked, root, manifest)
        try:
            checked = validate_manifest(manifest, settings, classes, "file")
        except InvalidRequest as exc:
            raise InvalidRequest("file", _relative(exc.fields[0].problem, unpacked)) from None

        stored_bytes = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file())
        quotas.admit_upload(session, principal, stored_bytes, settings)
        dataset_id = uuid.uuid4()
        relative_root = root.relative_to(unpacked).as_posix()
        manifest_rel = (
            Path(manifest.source).relative_to(root).as_posix()
            if Path(manifest.source).is_file()
            else None
        )
        final = _store_upload(session, store, unpacked, principal.tenant_id, dataset_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    moved_root = final if relative_root == "." else f"{final}/{relative_root}"
    source = f"{moved_root}/{manifest_rel}" if manifest_rel else moved_root
    moved = Manifest(moved_root, manifest.samples, source)
    checked = Validated(moved, checked.content_sha256, checked.split_counts)
    return _add(
        session,
        principal,
        name,
        "upload",
        checked,
        source,
        moved_root,
        archive_sha256,
        dataset_id,
        stored_bytes,
    )


def _store_upload(
    session: Session,
    store: ArtifactStore,
    unpacked: Path,
    tenant_id: uuid.UUID,
    dataset_id: uuid.UUID,
) -> str:
    """Move the checked files into the artifact store as datasets/<tenant>/<data set>/...;
    they are removed again if the request rolls back. Returns their root's URI."""
    key = f"datasets/{tenant_id}/{dataset_id}"
    if store.remote:
        try:
            store.put_tree(unpacked, key)
        except OSError as exc:
            store.delete_prefix(key)
            raise ServiceUnavailable(
                f"the artifact store did not take the upload ({type(exc).__name__}); retry"
            ) from None
        after_rollback(session, lambda: store.delete_prefix(key))
        return store.uri(key)
    final = Path(store.uri(key))
    final.parent.mkdir(parents=True, exist_ok=True)
    unpacked.rename(final)
    after_rollback(session, lambda: shutil.rmtree(final, ignore_errors=True))
    return str(final)


def _check_manifest_size(root: Path, limit: int) -> None:
    """A manifest is read and parsed whole: refuse an oversize one before that."""
    for name in MANIFEST_NAMES:
        path = root / name
        if path.is_file() and path.stat().st_size > limit:
            raise InvalidRequest(
                "file",
                f"{name} is {path.stat().st_size} bytes, more than the limit of {limit} "
                "(max_manifest_bytes)",
            )


# Files operating systems add to archives on their own (Finder's __MACOSX/ and AppleDouble
# "._" files, .DS_Store, Windows' Thumbs.db / desktop.ini): dropped, never stored.
_OS_METADATA_FOLDERS = {"__MACOSX"}
_OS_METADATA_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _drop_os_metadata(unpacked: Path) -> None:
    """Delete operating systems' metadata files, then the folders left empty."""
    for folder in _OS_METADATA_FOLDERS:
        shutil.rmtree(unpacked / folder, ignore_errors=True)
    for path in list(unpacked.rglob("*")):
        if path.is_file() and (path.name in _OS_METADATA_FILES or path.name.startswith("._")):
            path.unlink()
    for path in sorted(unpacked.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _refuse_unlisted_files(unpacked: Path, root: Path, manifest: Manifest) -> None:
    """An upload holds the manifest and the images it lists, nothing else: a file the
    manifest does not list, or a listed one not named as an image, is refused by name."""
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for sample in manifest.samples:
        if Path(sample.path).suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidRequest(
                "file",
                f"sample {sample.id!r}: {sample.path} is not an image file name "
                f"(one of {suffixes})",
            )
    listed = {root / sample.path for sample in manifest.samples}
    if Path(manifest.source).is_file():
        listed.add(Path(manifest.source))
    unlisted = sorted(
        str(path.relative_to(unpacked))
        for path in unpacked.rglob("*")
        if path.is_file() and path not in listed
    )
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (", ..." if len(unlisted) > 5 else "")
        count = f"{len(unlisted)} files are" if len(unlisted) > 1 else "1 file is"
        raise InvalidRequest(
            "file",
            f"{count} neither the manifest nor an image it lists: {shown} "
            "(an upload holds only those)",
        )


def _data_root(unpacked: Path) -> Path:
    """The unpacked folder, or its one top-level folder (archives of 'mydata/...')."""
    entries = [p for p in unpacked.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return unpacked


def _relative(message: str, folder: Path) -> str:
    """A message without the server's scratch paths in it."""
    return message.replace(str(folder) + "/", "").replace(str(folder), "archive")


def _add(
    session: Session,
    principal: Principal,
    name: str,
    source: str,
    checked: Validated,
    manifest_uri: str,
    root_uri: str,
    archive_sha256: str | None,
    dataset_id: uuid.UUID | None = None,
    stored_bytes: int | None = None,
) -> Dataset:
    manifest = checked.manifest
    dataset = DatasetRepository(session, principal.tenant_id).add(
        Dataset(
            id=dataset_id or uuid.uuid4(),
            name=name,
            source=source,
            manifest_uri=manifest_uri,
            root_uri=root_uri,
            manifest_sha256=manifest.sha256(),
            content_sha256=checked.content_sha256,
            archive_sha256=archive_sha256,
            sample_count=len(manifest.samples),
            labels=manifest.labels,
            split_counts=checked.split_counts,
            stored_bytes=stored_bytes,
        )
    )
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="dataset.registered",
        resource_type="dataset",
        resource_id=dataset.id,
        details={
            "name": name,
            "source": source,
            "content_sha256": dataset.content_sha256,
            "sample_count": dataset.sample_count,
        },
    )
    return dataset
