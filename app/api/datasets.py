"""/v1/datasets: register a data set by manifest URI or upload it as an archive."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from app.api.common import AUTH_ERRORS, DeletionReason, PagingDep, SettingsDep, errors
from app.artifacts import store_for
from app.auth import Principal, require
from app.db.models import Dataset
from app.db.repositories import DatasetRepository
from app.dependencies import DbSession
from app.errors import NotFound
from app.schemas.common import ListResponse
from app.schemas.datasets import DatasetCreate, DatasetOut
from app.services import datasets as service
from app.services import retention

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

Writer = Annotated[Principal, Depends(require("models:write"))]
Reader = Annotated[Principal, Depends(require("models:read", "jobs:read"))]


def dataset_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        source=dataset.source,  # type: ignore[arg-type]
        manifest_uri=dataset.manifest_uri if dataset.source == "uri" else None,
        manifest_sha256=dataset.manifest_sha256,
        content_sha256=dataset.content_sha256,
        archive_sha256=dataset.archive_sha256,
        sample_count=dataset.sample_count,
        labels=dataset.labels,
        split_counts=dataset.split_counts,
        created_at=dataset.created_at,
        deleted_at=dataset.deleted_at,
        deleted_by=dataset.deleted_by,
        deletion_reason=dataset.deletion_reason,
    )


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses=errors(*AUTH_ERRORS, 413, 422),
    summary="Register a data set by the URI of its manifest",
)
def register_dataset(
    body: DatasetCreate,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    response: Response,
) -> DatasetOut:
    """Reads and validates the manifest and every image (ids unique, paths inside the root,
    labels among the model's classes when `model_id` is given, images decode)."""
    dataset = service.register_from_uri(session, principal, body, settings)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset_out(dataset)


@router.post(
    ":upload",
    status_code=201,
    response_model=DatasetOut,
    responses=errors(*AUTH_ERRORS, 413, 422, 429),
    summary="Upload a data set as a zip or tar archive",
)
def upload_dataset(
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    response: Response,
    file: Annotated[
        UploadFile,
        File(
            description="zip (stored, deflate, bzip2 or lzma) or tar (plain, .gz, .bz2, .xz): "
            "a manifest and the images it lists."
        ),
    ],
    name: Annotated[str, Form(min_length=1, max_length=200, pattern=r"^[^\x00]+$")],
    model_id: Annotated[uuid.UUID | None, Form(description="Check labels against it.")] = None,
) -> DatasetOut:
    """The archive holds manifest.jsonl or manifest.csv (id, path, label, split) and the
    images it lists, or an ImageFolder tree (class/image), optionally inside one top-level
    folder. Only the manifest and its images are stored: any other file is refused (422,
    naming the files), except operating systems' metadata (`__MACOSX/`, `._*`, `.DS_Store`,
    `Thumbs.db`, `desktop.ini`), which is dropped. Listed paths must end in an image suffix.

    Refused with 422 naming the member or sample, and then nothing is stored: links, devices
    and other special files, paths leaving the archive, encrypted members, more than
    `max_archive_members` members, more than `max_extracted_bytes` unpacked or more than
    `max_compression_ratio` times the archive's size (counted as it is decompressed, in
    bounded chunks, never trusting the headers), a manifest over `max_manifest_bytes` or
    `max_dataset_samples` samples, a decompressor needing more than
    `max_decompressor_memory_bytes`, an image over `max_image_pixels` (read from its header,
    before decoding), images that do not decode, duplicate ids. 413 above
    `max_upload_bytes`; 429 with Retry-After while the tenant already has
    `max_concurrent_uploads` uploads being checked."""
    dataset = service.register_upload(session, principal, name, file.file, model_id, settings)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset_out(dataset)


@router.get(
    "",
    response_model=ListResponse[DatasetOut],
    responses=errors(*AUTH_ERRORS, 422),
    summary="List data sets",
)
def list_datasets(
    principal: Reader,
    session: DbSession,
    paging: PagingDep,
    include_deleted: Annotated[
        bool, Query(description="List deleted data sets (tombstones) too.")
    ] = False,
) -> ListResponse[DatasetOut]:
    repo = DatasetRepository(session, principal.tenant_id)
    page = paging.page(lambda size, token: repo.page(size, token, include_deleted))
    return ListResponse(
        items=[dataset_out(d) for d in page.items], next_page_token=page.next_page_token
    )


@router.get(
    "/{dataset_id}",
    response_model=DatasetOut,
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="Get a data set",
)
def get_dataset(dataset_id: uuid.UUID, principal: Reader, session: DbSession) -> DatasetOut:
    dataset = DatasetRepository(session, principal.tenant_id).get(dataset_id)
    if dataset is None:
        raise NotFound(f"data set {dataset_id} not found")
    return dataset_out(dataset)


@router.delete(
    "/{dataset_id}",
    response_model=DatasetOut,
    responses=errors(*AUTH_ERRORS, 404, 409, 422),
    summary="Delete a data set (a tombstone stays)",
)
def delete_dataset(
    dataset_id: uuid.UUID,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    reason: DeletionReason = "deleted on request",
) -> DatasetOut:
    """Deletes the files the service stores for the data set (an upload's manifest and
    images). A data set registered by URI lives in the tenant's own storage: nothing of it
    is deleted there, the registration is. Kept, as a tombstone: the row with its name,
    hashes and counts (jobs and their reports name it), who deleted it, when and why; the
    audit trail records it. A deleted data set can no longer be used by a job. 409 while a
    job that has not ended uses it. Deleting a deleted data set answers its tombstone."""
    dataset = DatasetRepository(session, principal.tenant_id).get(dataset_id, for_update=True)
    if dataset is None:
        raise NotFound(f"data set {dataset_id} not found")
    store = store_for(settings)
    removal = retention.delete_dataset(session, store, dataset, principal.actor, reason)
    # Before the commit: a committed tombstone always means the files are gone (if the
    # commit fails, the files are gone anyway and a retry records it).
    removal.delete(store)
    return dataset_out(dataset)
