"""/v1/models: register models, list them and their versions, download weights."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

import fsspec
from fastapi import APIRouter, Depends, Path, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from app import version_store
from app.api.common import AUTH_ERRORS, DeletionReason, PagingDep, SettingsDep, errors
from app.artifacts import store_for
from app.auth import Principal, require
from app.db.deletion_repositories import DeletionRequestRepository
from app.db.models import Model, ModelVersion
from app.db.repositories import ModelRepository
from app.db.session import after_commit
from app.dependencies import DbSession
from app.errors import NotFound
from app.schemas.common import ListResponse
from app.schemas.models import ModelCreate, ModelOut, ModelVersionOut
from app.services import models as service
from app.services import retention
from app.services.retention import RetentionPolicy
from app.settings import Settings
from app.storage import is_local, local_path

router = APIRouter(prefix="/v1/models", tags=["models"])

Writer = Annotated[Principal, Depends(require("models:write"))]
Reader = Annotated[Principal, Depends(require("models:read", "jobs:read"))]
Downloader = Annotated[Principal, Depends(require("models:read"))]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="1 is the base model.")]


def model_out(model: Model) -> ModelOut:
    return ModelOut(
        id=model.id,
        name=model.name,
        description=model.description,
        family=model.family,  # type: ignore[arg-type]
        architecture=model.architecture,
        classes=model.classes,
        templates=model.spec.get("templates"),
        model_config_uri=model.spec.get("model_config_path"),
        image_size=model.spec.get("image_size"),
        latest_version=model.latest_version,
        created_at=model.created_at,
        updated_at=model.updated_at,
    )


def version_out(
    version: ModelVersion,
    parents: dict[uuid.UUID, int],
    policy: RetentionPolicy,
    carried: dict[uuid.UUID, list[uuid.UUID]] | None = None,
) -> ModelVersionOut:
    return ModelVersionOut(
        status=_status(version),
        usable=retention.blocked(version, policy) is None,
        superseded_at=version.superseded_at,
        kept_at=version.kept_at,
        kept_by=version.kept_by,
        kept_reason=version.kept_reason,
        deleted_at=version.deleted_at,
        deleted_by=version.deleted_by,
        deletion_reason=version.deletion_reason,
        version=version.version,
        weights_sha256=version.weights_sha256,
        size_bytes=version.size_bytes,
        finetuning=version.finetuning,
        parent_version=parents.get(version.parent_version_id)
        if version.parent_version_id
        else None,
        produced_by_job_id=version.produced_by_job_id,
        deletion_requests=(carried or {}).get(version.id, []),
        created_at=version.created_at,
        download_url=f"/v1/models/{version.model_id}/versions/{version.version}/weights",
    )


def versions_out(
    session: DbSession,
    settings: Settings,
    repo: ModelRepository,
    model_id: uuid.UUID,
    only: ModelVersion | None = None,
) -> list[ModelVersionOut]:
    """The model's versions (or `only` one of them) as the API shows them: with their parent's
    number, whether the tenant's retention policy lets them be used, and the requests they
    carry."""
    versions = repo.versions(model_id)
    parents = {v.id: v.version for v in versions}
    policy = retention.policy_for(session, repo.tenant_id, settings)
    carried = DeletionRequestRepository(session, repo.tenant_id).carried_by_versions(model_id)
    shown = versions if only is None else [only]
    return [version_out(v, parents, policy, carried) for v in shown]


def _status(version: ModelVersion) -> str:
    if version.deleted_at is not None:
        return "deleted"
    if version.superseded_at is not None:
        return "kept" if version.kept_at is not None else "superseded"
    return "available"


def _model(repo: ModelRepository, model_id: uuid.UUID) -> Model:
    model = repo.get(model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses=errors(*AUTH_ERRORS, 409, 413, 422),
    summary="Register a base model",
)
def register_model(
    body: ModelCreate,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    response: Response,
) -> ModelOut:
    """Registers a model; the server reads the weights and stores their sha256 as version 1."""
    model, _ = service.register_model(session, principal, body, settings)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return model_out(model)


@router.get(
    "",
    response_model=ListResponse[ModelOut],
    responses=errors(*AUTH_ERRORS, 422),
    summary="List models",
)
def list_models(principal: Reader, session: DbSession, paging: PagingDep) -> ListResponse[ModelOut]:
    page = paging.page(ModelRepository(session, principal.tenant_id).page)
    return ListResponse(
        items=[model_out(m) for m in page.items], next_page_token=page.next_page_token
    )


@router.get(
    "/{model_id}",
    response_model=ModelOut,
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="Get a model",
)
def get_model(model_id: uuid.UUID, principal: Reader, session: DbSession) -> ModelOut:
    return model_out(_model(ModelRepository(session, principal.tenant_id), model_id))


@router.get(
    "/{model_id}/versions",
    response_model=ListResponse[ModelVersionOut],
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="List a model's versions, oldest first",
)
def list_versions(
    model_id: uuid.UUID, principal: Reader, session: DbSession, settings: SettingsDep
) -> ListResponse[ModelVersionOut]:
    """Every version, deleted ones too (as tombstones, status "deleted"): the lineage."""
    repo = ModelRepository(session, principal.tenant_id)
    _model(repo, model_id)
    return ListResponse(items=versions_out(session, settings, repo, model_id))


@router.get(
    "/{model_id}/versions/{version}",
    response_model=ModelVersionOut,
    responses=errors(*AUTH_ERRORS, 404, 422),
    summary="Get one version of a model",
)
def get_version(
    model_id: uuid.UUID,
    version: VersionNumber,
    principal: Reader,
    session: DbSession,
    settings: SettingsDep,
) -> ModelVersionOut:
    repo = ModelRepository(session, principal.tenant_id)
    found = repo.version(model_id, version)
    if found is None:
        raise NotFound(f"model {model_id} has no version {version}")
    return versions_out(session, settings, repo, model_id, only=found)[0]


@router.delete(
    "/{model_id}/versions/{version}",
    response_model=ModelVersionOut,
    responses=errors(*AUTH_ERRORS, 404, 409, 422),
    summary="Delete a version's weights (a tombstone stays)",
)
def delete_version(
    model_id: uuid.UUID,
    version: VersionNumber,
    principal: Writer,
    session: DbSession,
    settings: SettingsDep,
    reason: DeletionReason = "deleted on request",
) -> ModelVersionOut:
    """Deletes the weights the service stores for the version (a version registered from
    the tenant's own storage, version 1, is not the service's to delete there: it is blocked
    instead). Versions stored as sparse deltas of it are stored dense first, so their bytes
    and sha256 do not change. Kept, as a tombstone: the row with its sha256, size and
    lineage (reports name it), who deleted it, when and why; the audit trail records it.
    Its weights then answer 410 and no job can start from it. 409 while a job that has not
    ended runs on it."""
    repo = ModelRepository(session, principal.tenant_id)
    _model(repo, model_id)
    found = repo.version(model_id, version)
    if found is None:
        raise NotFound(f"model {model_id} has no version {version}")
    store = store_for(settings)
    removal = retention.delete_version(session, store, settings, found, principal.actor, reason)
    # After the commit: the dense copies of its delta children are committed first.
    after_commit(session, lambda: removal.delete(store))
    return versions_out(session, settings, repo, model_id, only=found)[0]


@router.get(
    "/{model_id}/versions/{version}/weights",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The weights file; its sha256 is in the X-Checksum-Sha256 header.",
        },
        307: {
            "description": "A presigned URL of the weights in the object store, in Location "
            "(when the operator sets NEGMERGE_WEIGHTS_DOWNLOAD_REDIRECT)."
        },
        410: {
            "description": "The version was deleted (a tombstone), or is superseded: a job "
            "unlearned from it and it still holds the data that job forgot (the tenant's "
            "retention policy; an admin may keep it with a reason)."
        },
        **errors(*AUTH_ERRORS, 404, 422),
    },
    summary="Download a version's weights",
)
def download_weights(
    model_id: uuid.UUID,
    version: VersionNumber,
    principal: Downloader,
    session: DbSession,
    settings: SettingsDep,
) -> Response:
    found = ModelRepository(session, principal.tenant_id).version(model_id, version)
    if found is None:
        raise NotFound(f"model {model_id} has no version {version}")
    retention.check_downloadable(session, found, settings)
    headers = {"X-Checksum-Sha256": found.weights_sha256}
    filename = f"{model_id}-v{version}.safetensors"
    store = store_for(settings)
    delta = version_store.delta_key_of(store, found.weights_uri)
    if delta is not None:
        if not store.exists(delta):
            raise NotFound(f"model {model_id} version {version}: the weights object is gone")
        # Stored as its parent plus a sparse delta: the dense bytes are made on the way, one
        # tensor slice at a time, and hashed; a mismatch with the version's sha256 aborts
        # the response (Content-Length then tells the client it got less than all).
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
        headers["Content-Length"] = str(found.size_bytes)
        return StreamingResponse(
            version_store.iter_materialised(
                store, delta, found.weights_sha256, settings.scratch_root
            ),
            media_type="application/octet-stream",
            headers=headers,
        )
    if is_local(found.weights_uri):
        path = local_path(found.weights_uri)
        if not path.is_file():
            raise NotFound(f"model {model_id} version {version}: the weights file is gone")
        return FileResponse(
            path, media_type="application/octet-stream", filename=filename, headers=headers
        )
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    key = store.key_of(found.weights_uri) if store.remote else None
    if key is None:  # weights registered from a tenant's own fsspec URI
        return StreamingResponse(
            _chunks(found.weights_uri), media_type="application/octet-stream", headers=headers
        )
    if not store.exists(key):
        raise NotFound(f"model {model_id} version {version}: the weights object is gone")
    if settings.weights_download_redirect:
        url = store.presigned_url(key, settings.weights_redirect_expiry_seconds)
        return RedirectResponse(url, status_code=307, headers=headers)
    # Streamed block by block from the store, never whole in memory; the bytes are hashed on
    # the way and a mismatch with the recorded sha256 aborts the response (Content-Length
    # then tells the client it got less than all).
    headers["Content-Length"] = str(store.size(key))
    return StreamingResponse(
        store.iter_verified(key, found.weights_sha256),
        media_type="application/octet-stream",
        headers=headers,
    )


def _chunks(uri: str) -> Iterator[bytes]:
    with fsspec.open(uri, "rb") as f:
        while block := f.read(1024 * 1024):
            yield block
