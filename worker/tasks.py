"""The one task, "negmerge.run_step"(job_id, step): claim the step, run it, record it.

The database row is the truth about a job; the message only names the step. A step runs only
if this worker wins its lease (app.services.steps.claim_step); the stage itself is a function
of negmerge.pipeline, which writes its outputs atomically and skips what is already there, so
a step run again after a crash redoes only unfinished work and writes the same bytes. The
outcome and the next steps are recorded in one transaction; their messages are sent after it
commits.

    prepare -> finetune:0..n-1 (gpu queue) -> merge (sent by the last variant) -> search
            -> finalize (verdict; new model version unless lambda is 0; job.result) -> SUCCEEDED
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from app.db.models import JobState
from app.db.session import Database
from app.queue import RUN_STEP_TASK, JobQueue
from app.services import steps
from app.services.models import add_version
from app.settings import Settings, get_settings
from app.storage import is_local, local_path
from negmerge.errors import DataError, NegMergeError
from negmerge.io import file_sha256
from negmerge.pipeline import (
    JobContext,
    JobSpec,
    Workdir,
    describe_validation_error,
    finalize,
    finetune_variant,
    merge_variants,
    prepare,
    search,
)
from worker.celery_app import app

log = logging.getLogger(__name__)

# The database is down or restarting: the task is retried with backoff, and the step goes on
# where it left off (its lease is kept across retries of one message).
DB_ERRORS = (OperationalError, InterfaceError)


class JobCancelled(Exception):
    """Raised from a progress callback when the job is being cancelled."""


@dataclass
class Runtime:
    """What a worker process uses: settings, database, queue; one per process (made after
    the fork, so no connection is shared between processes)."""

    settings: Settings
    db: Database
    queue: JobQueue
    pid: int


_runtime: Runtime | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = get_settings()
        _runtime = Runtime(
            settings, Database(settings.database_url, pool_size=2), JobQueue(settings), os.getpid()
        )
    return _runtime


@app.task(
    name=RUN_STEP_TASK,
    bind=True,
    autoretry_for=DB_ERRORS,
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=60,
)
def run_step(self, job_id: str, step: str) -> str:  # type: ignore[no-untyped-def]
    """Run step `step` of job `job_id` if it is this worker's to run."""
    try:
        job = uuid.UUID(str(job_id))
    except ValueError:
        log.warning("ignoring a message for job %r: not a job id", job_id)
        return "invalid"
    # The owner names the message and its retry number: a retry after a database error keeps
    # the lease, a duplicate delivery of the same message does not get it.
    return execute_step(job, str(step), f"{self.request.id}/{self.request.retries}")


def execute_step(job_id: uuid.UUID, name: str, owner: str) -> str:
    """Claim, run and record one step; returns what happened (for logs and tests)."""
    rt = runtime()
    with rt.db.unit_of_work() as session:
        claim = steps.claim_step(session, job_id, name, owner, rt.settings)
    if claim is None:
        log.info("step %s of job %s: not ours to run (done, held, or the job ended)", name, job_id)
        return "skipped"
    log.info("step %s of job %s: attempt %d", name, job_id, claim.attempt)
    with LeaseKeeper(rt, claim):
        try:
            outcome = run_stage(rt, claim)
        except JobCancelled:
            with rt.db.unit_of_work() as session:
                steps.step_cancelled(session, claim)
            log.info("step %s of job %s: cancelled", name, job_id)
            return "cancelled"
        except DB_ERRORS:
            raise
        except NegMergeError as exc:
            code = "data_error" if isinstance(exc, DataError) else "unlearning_error"
            _fail(rt, claim, code, f"{name}: {exc}")
            return "failed"
        except Exception as exc:
            log.exception("step %s of job %s failed", name, job_id)
            _fail(rt, claim, "internal_error", f"{name}: {type(exc).__name__}: {exc}")
            return "failed"
    return outcome


def _fail(rt: Runtime, claim: steps.Claim, code: str, message: str) -> None:
    with rt.db.unit_of_work() as session:
        steps.step_failed(session, claim, code, message)


# ---- the stages -----------------------------------------------------------------------------


def workdir_for(settings: Settings, job_id: uuid.UUID) -> Path:
    """The job's work directory: <artifact_root>/jobs/<job id> (a server-generated key)."""
    if not is_local(settings.artifact_root):
        raise NegMergeError(
            "artifact_root: the workers' work directories need a local or shared file system "
            f"path; {settings.artifact_root!r} is not one"
        )
    return local_path(settings.artifact_root) / "jobs" / str(job_id)


def load_context(rt: Runtime, claim: steps.Claim) -> JobContext:
    try:  # the library's rules again: a spec stored before a rule existed fails cleanly
        spec = JobSpec.model_validate(claim.spec)
    except ValidationError as exc:
        raise NegMergeError(describe_validation_error(exc)) from None
    root = workdir_for(rt.settings, claim.job_id)
    Workdir(root).claim(spec)
    return JobContext.load(spec, root)


def run_stage(rt: Runtime, claim: steps.Claim) -> str:
    index = steps.variant_index(claim.step)
    if claim.step == steps.PREPARE:
        output = prepare(load_context(rt, claim))
    elif index is not None:
        progress = ProgressWriter(rt, claim.job_id)
        output = finetune_variant(load_context(rt, claim), index, progress.on_step)
    elif claim.step == steps.MERGE:
        began = time.perf_counter()
        output = {**merge_variants(load_context(rt, claim)), "seconds": 0.0}
        output["seconds"] = time.perf_counter() - began
    elif claim.step == steps.SEARCH:
        progress = ProgressWriter(rt, claim.job_id)
        output = search(load_context(rt, claim), progress.on_evaluation)
    elif claim.step == steps.FINALIZE:
        return run_finalize(rt, claim)
    else:  # claim_step only hands out known steps
        raise ValueError(f"unknown step {claim.step!r}")

    with rt.db.unit_of_work() as session:
        following = steps.complete_step(session, claim, output, rt.queue)
    if claim.step == steps.MERGE and not claim.request.get("keep_task_vectors", False):
        delete_task_vectors(output)
    log.info("step %s of job %s: done; next %s", claim.step, claim.job_id, following)
    return "done"


def delete_task_vectors(merged: dict[str, Any]) -> None:
    """The n task vectors are not needed once merged (their sha256 are in the report)."""
    for record in merged.get("variants", []):
        Path(record["path"]).unlink(missing_ok=True)


def run_finalize(rt: Runtime, claim: steps.Claim) -> str:
    ctx = load_context(rt, claim)
    original = claim.outputs[steps.PREPARE]
    merged = claim.outputs[steps.MERGE]
    searched = claim.outputs[steps.SEARCH]
    timings = {
        "prepare": original.get("seconds"),
        "finetune": sum(v.get("seconds") or 0.0 for v in merged["variants"]),
        "merge": merged.get("seconds"),
        "search": searched.get("seconds"),
    }
    report = finalize(ctx, original, merged, searched, timings)
    verdict = report["verdict"]
    with rt.db.unit_of_work() as session:
        job = steps.held_job(session, claim)
        if job is None:
            return "skipped"
        # lambda 0 leaves the model as it was: no new version, and the verdict says why.
        model = None
        if report["model"] is not None:
            sha256 = report["model"]["sha256"]
            stored = store_model(rt.settings, job.model_id, Path(report["model"]["path"]), sha256)
            version = add_version(
                session,
                job.tenant_id,
                job.model_id,
                weights_uri=str(stored),
                weights_sha256=sha256,
                size_bytes=stored.stat().st_size,
                parent_version_id=job.model_version_id,
                produced_by_job_id=job.id,
                actor=steps.WORKER,
                finetuning=ctx.spec.finetuning,
            )
            model = {
                "model_id": str(job.model_id),
                "version": version.version,
                "version_id": str(version.id),
                "weights_sha256": sha256,
            }
        result = {
            "model": model,
            "model_version": model["version"] if model else None,
            "verdict": verdict,
            "lambda": report["lambda"],
            "lambda_curve": searched.get("evaluations", []),
            "kept_fraction": report["merge"]["kept_fraction"],
            "metrics": report["metrics"],
            "metrics_before": report["metrics"]["before"],
            "metrics_after": report["metrics"]["after"],
            "split_sizes": report["split_sizes"],
            "code_version": report["code_version"],
            "seeds": report["seeds"],
            "base_model_sha256": report["base_model"]["sha256"],
            "merged_sha256": report["merge"]["merged_sha256"],
            "merged_bytes": report["merge"].get("merged_bytes"),
            "merged_dense_bytes": report["merge"].get("merged_dense_bytes"),
            "task_vector_sha256": [v["tau_sha256"] for v in report["variants"]],
            "timings": report["timings"],
            "finetuning": ctx.spec.finetuning,
        }
        summary = {
            "report_path": str(ctx.workdir.report),
            "model_sha256": model["weights_sha256"] if model else None,
        }
        steps.finish_job(session, claim, summary, result)
    log.info(
        "job %s: SUCCEEDED, target %s, model version %s",
        claim.job_id,
        "met" if verdict["met"] else "NOT met",
        result["model_version"],
    )
    return "done"


def store_model(settings: Settings, model_id: uuid.UUID, source: Path, sha256: str) -> Path:
    """Copy the unlearned model to <artifact_root>/models/<model id>/<sha256>.safetensors:
    content-addressed, so a second copy of the same bytes is the same file."""
    target = local_path(settings.artifact_root) / "models" / str(model_id)
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{sha256}.safetensors"
    if path.exists() and file_sha256(path) == sha256:
        return path
    tmp = target / f".{sha256}.{uuid.uuid4().hex[:8]}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    return path


# ---- progress, cancellation and the lease while a step runs ---------------------------------


class ProgressWriter:
    """Progress callbacks: write the loss at most once per progress_interval_seconds and check
    the cancel flag with the same read; raise JobCancelled when the job is being cancelled.
    A database hiccup costs a progress write, never the step."""

    def __init__(self, rt: Runtime, job_id: uuid.UUID) -> None:
        self.rt = rt
        self.job_id = job_id
        self.last = 0.0

    def _check(self, write: Callable[..., JobState | None]) -> None:
        try:
            with self.rt.db.unit_of_work() as session:
                state = write(session)
        except DB_ERRORS:
            log.warning("job %s: could not write progress", self.job_id, exc_info=True)
            return
        if state is None or state in (JobState.CANCELLING, JobState.CANCELLED):
            raise JobCancelled()

    def on_step(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last < self.rt.settings.progress_interval_seconds:
            return
        self.last = now
        self._check(lambda session: steps.report_loss(session, self.job_id, float(loss)))

    def on_evaluation(self, lam: float, evaluation: object) -> None:
        self._check(lambda session: steps.lambda_evaluated(session, self.job_id, float(lam)))


class LeaseKeeper:
    """Renews the step's lease every quarter of its length while the step runs, so that only
    a dead worker's lease expires."""

    def __init__(self, rt: Runtime, claim: steps.Claim) -> None:
        self.rt = rt
        self.claim = claim
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        period = self.rt.settings.step_lease_seconds / 4
        while not self.stop.wait(period):
            try:
                with self.rt.db.unit_of_work() as session:
                    held = steps.renew_lease(session, self.claim, self.rt.settings)
                if not held:
                    log.warning("step %s of job %s: lease lost", self.claim.step, self.claim.job_id)
                    return
            except Exception:
                log.warning("could not renew the lease", exc_info=True)
