"""Registering models and adding versions to them."""

from __future__ import annotations

import json
import uuid

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth import Principal
from app.db.models import Model, ModelVersion
from app.db.repositories import ModelRepository
from app.errors import Conflict, InvalidRequest, NotFound, from_validation_error, named_part
from app.schemas.models import ModelCreate
from app.services import audit, retention
from app.settings import Settings
from app.storage import UriNotAllowed, check_allowed, is_local, local_path, sha256_and_size
from app.weights_check import check_weights_in_child
from negmerge.errors import CheckpointError, NegMergeError
from negmerge.models import ModelSpec


def _model_config_path(body: ModelCreate, settings: Settings, tenant_id: uuid.UUID) -> str:
    """The custom open_clip config's local path, once it is known to be a JSON object."""
    if body.family != "open_clip":
        raise InvalidRequest("model_config_uri", "only models of family open_clip take one")
    try:
        uri = check_allowed(body.model_config_uri or "", settings.data_roots, tenant_id)
    except UriNotAllowed as exc:
        raise InvalidRequest("model_config_uri", str(exc)) from None
    if not is_local(uri):
        raise InvalidRequest("model_config_uri", "must be a local file")
    try:
        config = json.loads(local_path(uri).read_text())
    except OSError:  # its message names the server's path
        raise InvalidRequest("model_config_uri", "cannot be read (a folder?)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest("model_config_uri", f"not a readable JSON file ({exc})") from None
    if not isinstance(config, dict) or "embed_dim" not in config:
        raise InvalidRequest("model_config_uri", "not an open_clip model config (no embed_dim)")
    return str(local_path(uri))


def _check_weights_fit(spec: ModelSpec, settings: Settings) -> None:
    """Weights that do not load into the architecture fail now, not in the first job. The
    model is built in a child process: importing and building it here slowed every request."""
    try:
        check_weights_in_child(
            spec,
            timeout_seconds=settings.weights_check_timeout_seconds,
            memory_mib=settings.weights_check_memory_mib,
        )
    except CheckpointError as exc:
        problem = str(exc).removeprefix(f"{spec.weights}: ")
        raise InvalidRequest("weights_uri", problem) from None
    except NegMergeError as exc:  # the library names the part at fault first, if not weights
        part, problem = named_part(str(exc))
        if part in ("architecture", "init_args") or (part or "").startswith("init_args."):
            raise InvalidRequest(part, problem) from None
        raise InvalidRequest("weights_uri", str(exc)) from None


def register_model(
    session: Session, principal: Principal, body: ModelCreate, settings: Settings
) -> tuple[Model, ModelVersion]:
    """A new model with its weights as version 1."""
    repo = ModelRepository(session, principal.tenant_id)
    spec = {
        key: value
        for key, value in {
            "templates": body.templates,
            "image_size": body.image_size,
            "init_args": body.init_args,
        }.items()
        if value
    }
    if body.model_config_uri is not None:
        spec["model_config_path"] = _model_config_path(body, settings, principal.tenant_id)
    try:  # the library's own rules: unique classes, '{}' in templates, ...
        model_spec = ModelSpec(
            family=body.family, architecture=body.architecture, classes=body.classes, **spec
        )
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    try:
        weights_uri = check_allowed(body.weights_uri, settings.data_roots, principal.tenant_id)
        sha256, size = sha256_and_size(weights_uri)
    except UriNotAllowed as exc:
        raise InvalidRequest("weights_uri", str(exc)) from None
    if is_local(weights_uri):  # remote weights are checked when a job first loads them
        _check_weights_fit(model_spec.model_copy(update={"weights": weights_uri}), settings)
    if repo.get_by_name(body.name) is not None:
        raise Conflict(f"name: this tenant already has a model named {body.name!r}")

    model = Model(
        name=body.name,
        description=body.description,
        family=body.family,
        architecture=body.architecture,
        classes=body.classes,
        spec=spec,
        latest_version=1,
    )
    try:
        with session.begin_nested():  # a concurrent registration of the same name
            repo.add(model)
    except IntegrityError:
        raise Conflict(f"name: this tenant already has a model named {body.name!r}") from None
    version = repo.add_version(
        ModelVersion(
            model_id=model.id,
            version=1,
            weights_uri=weights_uri,
            weights_sha256=sha256,
            size_bytes=size,
        )
    )
    audit.record(
        session,
        tenant_id=principal.tenant_id,
        actor=principal.actor,
        action="model.registered",
        resource_type="model",
        resource_id=model.id,
        details={"name": model.name, "version": 1, "weights_sha256": sha256},
    )
    return model, version


def add_version(
    session: Session,
    tenant_id: uuid.UUID,
    model_id: uuid.UUID,
    *,
    weights_uri: str,
    weights_sha256: str,
    size_bytes: int,
    parent_version_id: uuid.UUID | None,
    produced_by_job_id: uuid.UUID | None,
    actor: str,
    finetuning: str = "standard",
) -> ModelVersion:
    """Add the next version of a model (the workers do, when a job succeeds)."""
    repo = ModelRepository(session, tenant_id)
    model = repo.get(model_id, for_update=True)  # serialises version numbers
    if model is None:
        raise NotFound(f"model {model_id} not found")
    model.latest_version += 1
    parent = repo.version_by_id(parent_version_id) if parent_version_id else None
    if parent is not None and produced_by_job_id is not None:
        retention.supersede(session, parent)
    version = repo.add_version(
        ModelVersion(
            model_id=model.id,
            version=model.latest_version,
            weights_uri=weights_uri,
            weights_sha256=weights_sha256,
            size_bytes=size_bytes,
            parent_version_id=parent_version_id,
            produced_by_job_id=produced_by_job_id,
            finetuning=finetuning,
        )
    )
    audit.record(
        session,
        tenant_id=tenant_id,
        actor=actor,
        action="model.version_added",
        resource_type="model",
        resource_id=model.id,
        details={
            "version": version.version,
            "weights_sha256": weights_sha256,
            "job_id": str(produced_by_job_id) if produced_by_job_id else None,
            "finetuning": finetuning,
        },
    )
    return version
