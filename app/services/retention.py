"""Retention: what the service keeps of a deletion request's data, and for how long.

A tenant's policy (over the service's defaults, NEGMERGE_RETENTION_*) says what happens when
a job ends:
- forget_data "delete": the forgotten samples' files of an uploaded forget data set are
  deleted (their manifest rows go too; the rest of the data set stays usable, its hashes
  recomputed). Only once the job SUCCEEDED with its target met: a job that did not forget
  keeps the data, so the request can be run again. A data set registered by URI is the
  tenant's own storage: recorded as not ours to delete. While another job that has not ended
  uses the data set, its deletion waits (the watchdog retries) rather than break that job.
- intermediates "delete": every weights file of the job's work directory (base copy, task
  vectors, merged vectors, the model's work copy, the decoded forget set) and its scratch
  folders; the JSON records (metrics, hashes, the report) stay.
- superseded "block": the version a job unlearned from still holds the forgotten data: it is
  neither downloaded (410) nor used as a base (422) unless an admin keeps it with a reason;
  "delete": its bytes are deleted (a tombstone), versions stored as deltas of it made dense
  first; "keep": it stays usable.

The transaction that ends a job marks it "pending" (job_ended); worker.retention carries the
deletion out (the worker that ended the job, else the watchdog) and records it on the job
(`data_deletion`) and in the audit trail. Functions here never commit.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from app import version_store
from app.artifacts import ArtifactStore
from app.db.base import utcnow
from app.db.models import (
    Dataset,
    JobState,
    ModelVersion,
    Tenant,
    UnlearningJob,
)
from app.db.repositories import JobRepository, ModelRepository, TenantRepository
from app.errors import Conflict, Gone, InvalidRequest, NotFound
from app.schemas.results import JobResult
from app.services import audit
from app.settings import Settings
from negmerge.data import Manifest
from negmerge.errors import DataError

PENDING, WAITING, DONE = "pending", "waiting", "done"


class RetentionPolicy(BaseModel):
    """What is deleted when a job ends (see the module's docstring)."""

    model_config = ConfigDict(extra="forbid")

    forget_data: Literal["delete", "keep"] = "delete"
    intermediates: Literal["delete", "keep"] = "delete"
    superseded: Literal["block", "delete", "keep"] = "block"


def default_policy(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(
        forget_data=settings.retention_forget_data,
        intermediates=settings.retention_intermediates,
        superseded=settings.retention_superseded,
    )


def policy_for(session: Session, tenant_id: uuid.UUID, settings: Settings) -> RetentionPolicy:
    """The tenant's policy: its own choices over the service's defaults."""
    tenant = TenantRepository(session).get(tenant_id)
    own = (tenant.retention_policy if tenant else None) or {}
    return default_policy(settings).model_copy(
        update=RetentionPolicy(**own).model_dump(include=set(own))
    )


def set_policy(session: Session, tenant: Tenant, changes: dict[str, str], actor: str) -> dict:
    """Set some of the tenant's retention choices (the others follow the service's defaults);
    an empty value clears a choice. Returns the tenant's own choices."""
    own = dict(tenant.retention_policy or {})
    for name, value in changes.items():
        if value:
            own[name] = value
        else:
            own.pop(name, None)
    RetentionPolicy(**own)  # refuses unknown names and values
    tenant.retention_policy = own or None
    audit.record(
        session,
        tenant_id=tenant.id,
        actor=actor,
        action="tenant.retention_changed",
        resource_type="tenant",
        resource_id=tenant.id,
        details={"retention_policy": own},
    )
    return own


def job_ended(job: UnlearningJob) -> None:
    """In the transaction that ends `job`: its data is due for deletion (worker.retention)."""
    if job.retention_state is None:
        job.retention_state = PENDING


# ---- superseded versions -------------------------------------------------------------------


def supersede(session: Session, parent: ModelVersion) -> None:
    """A job made a version from `parent`: `parent` still holds what the job forgot."""
    if parent.superseded_at is None:
        parent.superseded_at = utcnow()


def blocked(version: ModelVersion, policy: RetentionPolicy) -> str | None:
    """Why `version`'s weights may not be used, or None."""
    if version.deleted_at is not None:
        return (
            f"version {version.version} was deleted at {version.deleted_at.isoformat()} "
            f"({version.deletion_reason or 'no reason given'}); its weights are gone"
        )
    if (
        version.superseded_at is not None
        and version.kept_at is None
        and policy.superseded != "keep"
    ):
        return (
            f"version {version.version} is superseded: a later version was unlearned from "
            "it, and it still holds the data that job forgot, so it is neither downloaded "
            "nor used as a base (use the latest version; an admin may keep it with a "
            "reason: negmerge admin versions keep)"
        )
    return None


def check_downloadable(session: Session, version: ModelVersion, settings: Settings) -> None:
    reason = blocked(version, policy_for(session, version.tenant_id, settings))
    if reason is not None:
        raise Gone(f"model {version.model_id} {reason}")


def check_base(session: Session, version: ModelVersion, settings: Settings) -> None:
    reason = blocked(version, policy_for(session, version.tenant_id, settings))
    if reason is not None:
        raise InvalidRequest("model.version", reason)


def keep_version(session: Session, version: ModelVersion, reason: str, actor: str) -> None:
    """An admin keeps a superseded version usable, for a stated reason (recorded)."""
    if not reason.strip():
        raise InvalidRequest("reason", "a reason is required to keep a superseded version")
    if version.deleted_at is not None:
        raise Conflict(f"version {version.version} is deleted; there is nothing to keep")
    version.kept_at, version.kept_by, version.kept_reason = utcnow(), actor, reason.strip()
    audit.record(
        session,
        tenant_id=version.tenant_id,
        actor=actor,
        action="model.version_kept",
        resource_type="model",
        resource_id=version.model_id,
        details={"version": version.version, "reason": version.kept_reason},
    )


# ---- who still uses a data set or a version ------------------------------------------------


def active_jobs_using_dataset(session: Session, dataset: Dataset) -> list[UnlearningJob]:
    return JobRepository(session, dataset.tenant_id).active_using_dataset(dataset.id)


def active_jobs_using_version(session: Session, version: ModelVersion) -> list[UnlearningJob]:
    return JobRepository(session, version.tenant_id).active_using_version(version.id)


def in_use(jobs: list[UnlearningJob]) -> str:
    named = ", ".join(f"{job.id} ({job.state.value})" for job in jobs[:3])
    return f"in use by job {named}" if len(jobs) == 1 else f"in use by jobs {named}"


# ---- tombstones ----------------------------------------------------------------------------


@dataclass
class Removal:
    """The store objects a tombstone's bytes are, with their count and size."""

    keys: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    def delete(self, store: ArtifactStore) -> None:
        for key in self.keys:
            store.delete(key)


def stored_prefix(store: ArtifactStore, dataset: Dataset) -> str | None:
    """The store prefix of an uploaded data set's files, None if not the service's."""
    if dataset.source != "upload":
        return None
    prefix = f"datasets/{dataset.tenant_id}/{dataset.id}"  # as the upload stored it
    key = store.key_of(dataset.root_uri)
    return prefix if key is not None and (key == prefix or key.startswith(prefix + "/")) else None


def delete_dataset(
    session: Session, store: ArtifactStore, dataset: Dataset, actor: str, reason: str
) -> Removal:
    """Tombstone `dataset` (the row stays, with who, when and why); its stored files are
    returned for the caller to delete. 409 while a job that has not ended uses it."""
    if dataset.deleted_at is not None:
        return Removal()
    users = active_jobs_using_dataset(session, dataset)
    if users:
        raise Conflict(f"data set {dataset.id} is {in_use(users)}: cancel it or wait for it to end")
    removal = Removal()
    prefix = stored_prefix(store, dataset)
    if prefix is not None:
        for key in store.list_keys(prefix):
            removal.keys.append(key)
            removal.files += 1
            removal.bytes += _size(store, key)
    dataset.deleted_at, dataset.deleted_by, dataset.deletion_reason = utcnow(), actor, reason
    audit.record(
        session,
        tenant_id=dataset.tenant_id,
        actor=actor,
        action="dataset.deleted",
        resource_type="dataset",
        resource_id=dataset.id,
        details={
            "reason": reason,
            "files": removal.files,
            "bytes": removal.bytes,
            "content_sha256": dataset.content_sha256,
            "stored_by_service": prefix is not None,
        },
    )
    return removal


def _size(store: ArtifactStore, key: str) -> int:
    try:
        return store.size(key)
    except Exception:  # already gone
        return 0


def delete_version(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    version: ModelVersion,
    actor: str,
    reason: str,
) -> Removal:
    """Tombstone `version`; versions stored as deltas on it (or on one of its dependants)
    are stored dense first, in this transaction, so they keep their bytes and sha256. The
    bytes no live version needs any more are returned for deletion after commit. 409 while a
    job that has not ended uses it as its base."""
    if version.deleted_at is not None:
        return Removal()
    users = active_jobs_using_version(session, version)
    if users:
        raise Conflict(
            f"version {version.version} is {in_use(users)} as its base: cancel it or wait "
            "for it to end"
        )
    siblings = [
        v
        for v in ModelRepository(session, version.tenant_id).versions(version.model_id)
        if v.deleted_at is None and v.id != version.id
    ]
    own_key = store.key_of(version.weights_uri)
    ours = own_key is not None and own_key.startswith("models/")
    # Only this version's object and the deltas replaced here are deleted: never a listing
    # of the model's folder, which may hold a version a running job is adding right now.
    candidates = [own_key] if ours else []
    if ours:
        for child in siblings:
            child_key = version_store.delta_key_of(store, child.weights_uri)
            if child_key and own_key in version_store.chain_keys(store, child_key):
                child.weights_uri = version_store.make_dense(
                    store, child.model_id, child_key, child.weights_sha256, settings.scratch_root
                )
                candidates.append(child_key)
    needed: set[str] = set()
    for sibling in siblings:
        key = store.key_of(sibling.weights_uri)
        if key is not None:
            needed.update(version_store.chain_keys(store, key))
    removal = Removal()
    for key in candidates:
        if key is not None and key not in needed and store.fs.exists(store._path(key)):
            removal.keys.append(key)
            removal.files += 1
            removal.bytes += _size(store, key)
    version.deleted_at, version.deleted_by, version.deletion_reason = utcnow(), actor, reason
    audit.record(
        session,
        tenant_id=version.tenant_id,
        actor=actor,
        action="model.version_deleted",
        resource_type="model",
        resource_id=version.model_id,
        details={
            "version": version.version,
            "reason": reason,
            "weights_sha256": version.weights_sha256,
            "bytes": removal.bytes,
            "stored_by_service": ours,
        },
    )
    return removal


# ---- a job's forget data -------------------------------------------------------------------


@dataclass(frozen=True)
class ForgetFiles:
    """The forgotten samples of an uploaded data set: their image keys and the manifest
    that remains without them."""

    dataset: Dataset
    keys: list[str]
    remaining: Manifest


def forget_files(store: ArtifactStore, job: UnlearningJob, dataset: Dataset) -> ForgetFiles:
    """The stored files of the samples `job` forgot from `dataset` (an upload of ours)."""
    manifest = Manifest.load(dataset.manifest_uri, dataset.root_uri)
    forget = job.request.get("forget") or {}
    ids, classes = forget.get("ids"), forget.get("classes")
    if ids is not None:  # an earlier job may have forgotten some of them already
        present = {s.id for s in manifest.samples}
        ids = [i for i in ids if i in present]
    try:
        chosen = manifest.select(ids=ids, classes=classes) if ids or classes else []
    except DataError:  # a class that is gone already: nothing left of it
        chosen = []
    prefix = store.key_of(dataset.root_uri) or ""
    gone = {s.id for s in chosen}
    remaining = Manifest(
        manifest.root, tuple(s for s in manifest.samples if s.id not in gone), manifest.source
    )
    return ForgetFiles(dataset, [f"{prefix}/{s.path}" for s in chosen], remaining)


def write_manifest(store: ArtifactStore, manifest: Manifest, scratch: Path) -> None:
    """Store `manifest` where it was read from, in its own format (jsonl or csv)."""
    key = store.key_of(manifest.source)
    if key is None or not Path(key).suffix:  # an ImageFolder tree: the files are the manifest
        return
    rows = [
        {"id": s.id, "path": s.path, "label": s.label, "split": s.split} for s in manifest.samples
    ]
    if key.endswith(".csv"):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["id", "path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
        content = text.getvalue()
    else:
        content = "".join(json.dumps(row) + "\n" for row in rows)
    scratch.mkdir(parents=True, exist_ok=True)
    local = scratch / f"manifest-{uuid.uuid4().hex[:8]}"
    try:
        local.write_text(content)
        store.put_file(local, key)
    finally:
        local.unlink(missing_ok=True)


def forget_reason(
    job: UnlearningJob, policy: RetentionPolicy, dataset: Dataset | None
) -> str | None:
    """Why the forget data is not deleted, or None: delete it."""
    if policy.forget_data == "keep":
        return "kept: the tenant's retention policy keeps forget data"
    result = JobResult.of(job.result)
    if job.state is not JobState.SUCCEEDED or result is None or not result.met:
        return (
            f"kept: the job ended {job.state.value} without meeting its target, so the data "
            "was not forgotten; it stays for a new request (DELETE /v1/datasets/{id} deletes it)"
        )
    if dataset is None:
        return "the data set is gone"
    if dataset.deleted_at is not None:
        return f"the data set was deleted already ({dataset.deleted_at.isoformat()})"
    if dataset.source != "upload":
        return (
            "not the service's to delete: the data set is registered by URI and lives in the "
            "tenant's own storage"
        )
    return None


def updated_counts(dataset: Dataset, remaining: Manifest, content_sha256: str, freed: int) -> None:
    """The data set's row after its forgotten samples' files are deleted."""
    dataset.sample_count = len(remaining.samples)
    dataset.labels = remaining.labels
    splits: dict[str, int] = {}
    for sample in remaining.samples:
        splits[sample.split] = splits.get(sample.split, 0) + 1
    dataset.split_counts = splits
    dataset.manifest_sha256 = remaining.sha256()
    dataset.content_sha256 = content_sha256
    if dataset.stored_bytes is not None:
        dataset.stored_bytes = max(0, dataset.stored_bytes - freed)


def get_version(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID, number: int):  # type: ignore[no-untyped-def]
    found = ModelRepository(session, tenant_id).version(model_id, number)
    if found is None:
        raise NotFound(f"model {model_id} has no version {number}")
    return found
