"""Carrying out a finished job's retention (app.services.retention says what and why).

The transaction that ends a job marks it "pending". `apply_retention` then runs in three
steps, each safe to repeat, so that a duplicate run or a crash anywhere deletes nothing
twice wrongly and never loses the record:
1. plan (one transaction, the job's row locked): what is to go and how much of it (files,
   bytes), written on the job before anything is deleted; a forget data set another job
   still uses, or a superseded version another job runs on, waits ("waiting");
2. delete: the files the plan names that are still there (a repeat finds fewer, and deletes
   those); a superseded version's tombstone and its delta children made dense are committed
   before its bytes go;
3. record (one transaction): the job's `data_deletion` from the plan's counts, the data
   set's row without the forgotten samples, the audit entry "job.data_deleted"; "done".

It runs in the worker that ended the job, right after, and in every watchdog pass for jobs
still pending or waiting (ended by the API's cancel, by the watchdog, or a crashed worker).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from app.artifacts import ArtifactStore
from app.db.base import utcnow
from app.db.models import StepState, UnlearningJob
from app.db.repositories import DatasetRepository, JobRepository, ModelRepository, StepRepository
from app.db.session import Database
from app.schemas.results import JobResult
from app.services import audit, retention
from app.services.datasets import validate_manifest
from app.settings import Settings
from app.storage import local_path

log = logging.getLogger(__name__)
ACTOR = "retention"
WEIGHTS = ".safetensors"


def intermediate_files(
    store: ArtifactStore, settings: Settings, job_id: uuid.UUID, keep_task_vectors: bool = False
) -> list:
    """The job's weights files: its work directory's (base copy, task vectors unless the
    request keeps them, merged vectors, the model's work copy, the decoded forget set; the
    JSON records stay), and its scratch folders on this host. As ("key", key) for store
    objects, ("path", path) for local files."""
    found: list[tuple[str, Any]] = []
    prefix = f"jobs/{job_id}"
    if store.remote:
        found += [("key", k) for k in store.list_keys(prefix) if _is_weights(k)]
    else:
        root = local_path(settings.artifact_root) / "jobs" / str(job_id)
        found += [("path", p) for p in _files(root) if _is_weights(p.name)]
    if keep_task_vectors:
        found = [f for f in found if "/variants/" not in str(f[1])]
    scratch = Path(settings.scratch_root)
    for folder in (scratch / "bases" / str(job_id), scratch / str(job_id)):
        found += [("path", p) for p in _files(folder)]
    return found


def _is_weights(name: str) -> bool:
    # .tmp: a write a killed step left half done
    return name.endswith(WEIGHTS) or (WEIGHTS in name and name.endswith(".tmp"))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _size_of(store: ArtifactStore, entry: tuple[str, Any]) -> int:
    kind, where = entry
    if kind == "path":
        try:
            return where.stat().st_size
        except OSError:
            return 0
    try:
        return store.size(where)
    except Exception:
        return 0


def _delete(store: ArtifactStore, entry: tuple[str, Any]) -> None:
    kind, where = entry
    if kind == "path":
        where.unlink(missing_ok=True)
        Path(f"{where}.sha256").unlink(missing_ok=True)
    else:
        store.delete(where)


def apply_retention(
    db: Database, store: ArtifactStore, settings: Settings, job_id: uuid.UUID
) -> str | None:
    """Carry out job `job_id`'s retention if it is due; returns its state afterwards, or None
    if there was nothing to do."""
    with db.unit_of_work() as session:
        job = StepRepository(session).lock_job(job_id)
        if job is None or job.retention_state not in (retention.PENDING, retention.WAITING):
            return None
        if _step_still_running(session, job_id):
            # A variant of a FAILED job may still be writing its task vector: its worker
            # runs this again when its step ends (or the watchdog, when its lease expires).
            job.retention_state = retention.WAITING
            return retention.WAITING
        plan = _plan(session, store, settings, job)
        job.data_deletion = {**(job.data_deletion or {}), "plan": plan}
    forget_files = None
    dataset_id = plan["forget_data"].get("dataset_id") if plan["forget_data"]["delete"] else None
    keep_task_vectors = bool(job.request.get("keep_task_vectors"))
    if plan["intermediates"]["delete"]:
        for entry in intermediate_files(store, settings, job_id, keep_task_vectors):
            _delete(store, entry)
        for folder in _scratch_folders(settings, job_id):
            shutil.rmtree(folder, ignore_errors=True)
    superseded = plan.get("superseded")
    if superseded and superseded.get("delete"):
        with db.unit_of_work() as session:
            version = ModelRepository(session, job.tenant_id).version_by_id(
                uuid.UUID(superseded["version_id"])
            )
            removal = (
                retention.delete_version(
                    session,
                    store,
                    settings,
                    version,
                    ACTOR,
                    f"superseded by version {superseded['by_version']} (job {job_id}), whose "
                    "tenant's retention policy deletes superseded versions",
                )
                if version is not None
                else retention.Removal()
            )
        removal.delete(store)
    if dataset_id is not None:
        with db.unit_of_work() as session:
            job = JobRepository(session, job.tenant_id).get(job_id)
            dataset = DatasetRepository(session, job.tenant_id).get(uuid.UUID(dataset_id))
            forget_files = retention.forget_files(store, job, dataset)
        for key in forget_files.keys:
            store.delete(key)
        if forget_files.remaining.samples:
            retention.write_manifest(store, forget_files.remaining, Path(settings.scratch_root))
        elif (prefix := retention.stored_prefix(store, forget_files.dataset)) is not None:
            store.delete_prefix(prefix)  # every sample forgotten: the manifest goes too
    with db.unit_of_work() as session:
        job = StepRepository(session).lock_job(job_id)
        if job is None or job.retention_state not in (retention.PENDING, retention.WAITING):
            return None
        return _record(session, settings, job, forget_files)


def _step_still_running(session, job_id: uuid.UUID) -> bool:  # type: ignore[no-untyped-def]
    now = utcnow()
    return any(
        step.state is StepState.RUNNING
        and step.lease_expires_at is not None
        and step.lease_expires_at >= now
        for step in StepRepository(session).steps(job_id)
    )


def _scratch_folders(settings: Settings, job_id: uuid.UUID) -> list[Path]:
    scratch = Path(settings.scratch_root)
    return [scratch / "bases" / str(job_id), scratch / str(job_id)]


def _plan(session, store: ArtifactStore, settings: Settings, job: UnlearningJob) -> dict:  # type: ignore[no-untyped-def]
    """What this run deletes; the counts of a plan made before (a run that crashed after
    deleting) are kept, so the record counts what was there, not what is left."""
    earlier = (job.data_deletion or {}).get("plan") or {}
    policy = retention.policy_for(session, job.tenant_id, settings)
    plan: dict[str, Any] = {"policy": policy.model_dump()}

    intermediates = earlier.get("intermediates")
    if intermediates is None:
        delete = policy.intermediates == "delete"
        keep_task_vectors = bool(job.request.get("keep_task_vectors"))
        files = intermediate_files(store, settings, job.id, keep_task_vectors) if delete else []
        intermediates = {
            "delete": delete,
            "files": len(files),
            "bytes": sum(_size_of(store, f) for f in files),
            "task_vectors_kept": keep_task_vectors,
        }
    plan["intermediates"] = intermediates

    dataset = DatasetRepository(session, job.tenant_id).get(job.forget_dataset_id)
    forget = earlier.get("forget_data")
    if forget is None or forget.get("waiting"):
        reason = retention.forget_reason(job, policy, dataset)
        forget = {"delete": False, "reason": reason, "dataset_id": str(job.forget_dataset_id)}
        if reason is None:
            users = [j for j in retention.active_jobs_using_dataset(session, dataset)
                     if j.id != job.id]  # fmt: skip
            if users:
                forget["waiting"] = True
                forget["reason"] = (
                    f"waiting: the data set is {retention.in_use(users)}; its forgotten "
                    "samples are deleted when no job that has not ended uses it"
                )
            else:
                found = retention.forget_files(store, job, dataset)
                forget.update(
                    delete=True,
                    files=len(found.keys),
                    bytes=sum(_size_of(store, ("key", k)) for k in found.keys),
                    samples=len(found.keys),
                )
    plan["forget_data"] = forget

    superseded = earlier.get("superseded")
    if superseded is None or superseded.get("waiting"):
        superseded = _superseded_plan(session, job, policy)
    if superseded is not None:
        plan["superseded"] = superseded
    return plan


def _superseded_plan(session, job: UnlearningJob, policy) -> dict | None:  # type: ignore[no-untyped-def]
    result = JobResult.of(job.result)
    model = result.model if result else None
    if policy.superseded != "delete" or model is None:
        return None
    parent = ModelRepository(session, job.tenant_id).version_by_id(job.model_version_id)
    if parent is None or parent.deleted_at is not None or parent.kept_at is not None:
        return None
    plan = {"version_id": str(parent.id), "version": parent.version,
            "by_version": model.version, "delete": True}  # fmt: skip
    users = [j for j in retention.active_jobs_using_version(session, parent) if j.id != job.id]
    if users:
        plan.update(delete=False, waiting=True, reason=f"waiting: {retention.in_use(users)}")
    return plan


def _record(session, settings: Settings, job: UnlearningJob, found) -> str:  # type: ignore[no-untyped-def]
    plan = job.data_deletion["plan"]
    now = utcnow()
    forget = plan["forget_data"]
    if found is not None:
        dataset = DatasetRepository(session, job.tenant_id).get(found.dataset.id)
        if found.remaining.samples:
            checked = validate_manifest(found.remaining, settings, None, "dataset")
            retention.updated_counts(dataset, found.remaining, checked.content_sha256,
                                     forget["bytes"])  # fmt: skip
        else:  # every sample forgotten: nothing of the data set is left
            dataset.deleted_at, dataset.deleted_by = now, ACTOR
            dataset.deletion_reason = f"every sample was forgotten by job {job.id}"
            dataset.sample_count, dataset.stored_bytes = 0, 0
    waiting = bool(forget.get("waiting")) or bool((plan.get("superseded") or {}).get("waiting"))
    intermediates = plan["intermediates"]
    record: dict[str, Any] = {
        "policy": plan["policy"],
        "deleted_at": now.isoformat(),
        "forget_data": {
            "deleted": bool(forget.get("delete")),
            "dataset_id": forget.get("dataset_id"),
            "files": forget.get("files", 0),
            "bytes": forget.get("bytes", 0),
            "samples": forget.get("samples", 0),
            "manifest_sha256": job.forget_manifest_sha256,
            "reason": forget.get("reason")
            or "deleted: the forgotten samples' files and manifest rows; their hashes stay",
        },
        "intermediates": {
            "deleted": bool(intermediates["delete"]),
            "files": intermediates["files"],
            "bytes": intermediates["bytes"],
            "reason": (
                "deleted: weights files of the work directory and scratch; the JSON "
                "records (metrics, hashes, report) stay"
                + (
                    "; the task vectors are kept, as the request asked (keep_task_vectors)"
                    if intermediates.get("task_vectors_kept")
                    else ""
                )
            )
            if intermediates["delete"]
            else "kept: the tenant's retention policy keeps intermediates",
        },
    }
    superseded = plan.get("superseded")
    if superseded:
        record["superseded_version"] = superseded
    if waiting:
        # What is done stays done; the waiting part is planned again on the next run.
        plan["forget_data"] = {**forget, "waiting": True} if forget.get("waiting") else forget
        job.data_deletion = {**record, "plan": plan}
        job.retention_state = retention.WAITING
        return retention.WAITING
    job.data_deletion = record
    job.retention_state = retention.DONE
    audit.record(
        session,
        tenant_id=job.tenant_id,
        actor=ACTOR,
        action="job.data_deleted",
        resource_type="unlearning_job",
        resource_id=job.id,
        details=record,
    )
    return retention.DONE


def due_jobs(db: Database, limit: int = 50) -> list[uuid.UUID]:
    """Jobs whose retention is pending or waiting."""
    with db.unit_of_work() as session:
        return StepRepository(session).by_retention_state(
            [retention.PENDING, retention.WAITING], limit
        )


def apply_due(db: Database, store: ArtifactStore, settings: Settings) -> dict[str, int]:
    """The watchdog's pass: every due job's retention, each on its own; errors logged."""
    done: dict[str, int] = {}
    for job_id in due_jobs(db):
        try:
            outcome = apply_retention(db, store, settings, job_id)
        except Exception:
            log.warning("retention of job %s failed; the next pass tries again", job_id,
                        exc_info=True)  # fmt: skip
            continue
        if outcome:
            done[f"retention_{outcome}"] = done.get(f"retention_{outcome}", 0) + 1
    return done
