"""Registering data sets: from a manifest URI, or from an uploaded archive.

Either way the data set is validated before anything is stored: unique ids, paths inside
the root, labels in the model's classes (when a model is named), and every image decodes.
An upload's files are unpacked into a scratch folder and moved into the artifact store only
once they pass; if the request then rolls back, they are removed again.
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

from app.auth import Principal
from app.db.models import Dataset
from app.db.repositories import DatasetRepository, ModelRepository
from app.db.session import after_rollback
from app.errors import InvalidRequest
from app.schemas.datasets import DatasetCreate
from app.services import audit, quotas
from app.services.archives import ArchiveError, ArchiveLimits, extract_archive
from app.settings import Settings
from app.storage import UriNotAllowed, check_allowed, is_local, local_path
from negmerge.data import Manifest
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
            image_sha256 = _image_sha256(manifest, sample)
            row = [sample.id, sample.path, sample.label, sample.split, image_sha256]
            digest.update(json.dumps(row).encode() + b"\n")
    except DataError as exc:
        raise InvalidRequest(field, str(exc)) from None
    splits = Counter(sample.split for sample in manifest.samples)
    return Validated(manifest, digest.hexdigest(), dict(splits))


def _image_sha256(manifest: Manifest, sample) -> str:  # type: ignore[no-untyped-def]
    """Decode the sample's image (the library's checks and messages) and hash its bytes."""
    try:
        manifest.open(sample)
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
    manifest_uri = _allowed(body.manifest_uri, settings, "manifest_uri")
    root_uri = _allowed(body.root_uri, settings, "root_uri") if body.root_uri else None
    try:
        manifest = Manifest.load(manifest_uri, root_uri)
    except DataError as exc:
        raise InvalidRequest("manifest_uri", str(exc)) from None
    if root_uri is None:  # the default root (beside the manifest) must be allowed too
        _allowed(manifest.root, settings, "root_uri")
    checked = validate_manifest(manifest, settings, classes, "manifest_uri")
    return _add(session, principal, body.name, "uri", checked, manifest.source, manifest.root, None)


def _allowed(uri: str, settings: Settings, field: str) -> str:
    try:
        return check_allowed(uri, settings.data_roots)
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
    if not is_local(settings.artifact_root):
        raise InvalidRequest("file", "uploads need a local artifact_root on this server")
    classes = _model_classes(session, principal, model_id)
    store = local_path(settings.artifact_root)
    scratch = store / "tmp" / uuid.uuid4().hex
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
        )
        try:
            extract_archive(archive, unpacked, limits)
        except ArchiveError as exc:
            raise InvalidRequest("file", str(exc).removeprefix("file: ")) from None
        archive.unlink()
        root = _data_root(unpacked)
        try:
            manifest = Manifest.load(str(root))
        except DataError as exc:
            raise InvalidRequest("file", _relative(str(exc), unpacked)) from None
        try:
            checked = validate_manifest(manifest, settings, classes, "file")
        except InvalidRequest as exc:
            raise InvalidRequest("file", _relative(exc.fields[0].problem, unpacked)) from None

        stored_bytes = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file())
        quotas.admit_upload(session, principal, stored_bytes, settings)
        dataset_id = uuid.uuid4()
        final = store / "datasets" / str(principal.tenant_id) / str(dataset_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        unpacked.rename(final)
        after_rollback(session, lambda: shutil.rmtree(final, ignore_errors=True))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    relative_root = root.relative_to(unpacked)
    manifest_rel = (
        Path(manifest.source).relative_to(root) if Path(manifest.source).is_file() else None
    )
    moved_root = final / relative_root
    source = str(moved_root / manifest_rel) if manifest_rel else str(moved_root)
    moved = Manifest(str(moved_root), manifest.samples, source)
    checked = Validated(moved, checked.content_sha256, checked.split_counts)
    return _add(
        session,
        principal,
        name,
        "upload",
        checked,
        source,
        str(moved_root),
        archive_sha256,
        dataset_id,
        stored_bytes,
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
