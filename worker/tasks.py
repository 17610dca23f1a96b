"""The one task, "negmerge.run_step"(job_id, step): claim the step, run it, record it.

The database row is the truth about a job; the message only names the step. A step runs only
if this worker wins its lease (app.services.steps.claim_step); then its kind's runner (RUNNERS,
one for each kind of the step table, app.step_table) runs it. The stage itself is a function
of negmerge.pipeline, which writes its outputs atomically and skips what is already there, so
a step run again after a crash redoes only unfinished work and writes the same bytes. The
outcome (the stage's output, negmerge.stage_outputs, as JSON) and the next steps are recorded
in one transaction; their messages are sent after it commits.

    prepare -> finetune:0..n-1 (gpu queue) -> merge (sent by the last variant) -> search
            -> finalize (verdict; new model version unless lambda is 0; job.result) -> SUCCEEDED

A request that allows escalation (negmerge.escalation) may get further rounds: a finalize
whose target was not met sends round r's variants, finetune:r*n..(r+1)*n-1, and the round
goes on as merge@r -> search@r -> finalize@r.

With running merge storage (worker.merge_states), a fine-tuning step folds its task vector
into its worker's merge state instead of keeping it, and merge combines the states.
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

from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from app import version_store
from app.artifacts import ArtifactError, ArtifactStore, store_for
from app.db.models import JobState
from app.db.repositories import JobRepository, ModelRepository
from app.db.session import Database
from app.queue import RUN_STEP_TASK, JobQueue
from app.schemas.results import StoredVersion
from app.services import steps
from app.services.models import add_version
from app.services.results import job_result
from app.settings import Settings, get_settings
from app.step_table import (
    FINALIZE,
    FINETUNE,
    MERGE,
    PREPARE,
    SEARCH,
    STEPS,
    VARIANTS,
    Step,
    parse_step,
)
from app.storage import is_local, local_path
from negmerge.context import JobContext
from negmerge.errors import DataError, NegMergeError
from negmerge.escalation import RoundSummary
from negmerge.finetune import device_usage
from negmerge.io import file_sha256
from negmerge.job_spec import JobSpec, describe_validation_error
from negmerge.loading import LoaderOptions, MiB
from negmerge.pipeline import finalize, finetune_variant, merge_variants, prepare, search
from negmerge.stage_outputs import (
    Merged,
    MergeState,
    Original,
    Output,
    Searched,
    VariantRecord,
    to_stored,
)
from negmerge.workdir import Workdir
from worker import merge_states
from worker.celery_app import app
from worker.retention import apply_retention
from worker.staging import StagedStep, files_of, scratch_folder, stage_weights, store_errors

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
    store: ArtifactStore = None  # type: ignore[assignment]  # the settings' store by default

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = store_for(self.settings)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = get_settings()
        _runtime = Runtime(
            settings,
            Database(settings.database_url, pool_size=2),
            JobQueue(settings),
            os.getpid(),
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
        _retain(rt, job_id)  # the claim may have ended the job (CANCELLING -> CANCELLED)
        return "skipped"
    log.info("step %s of job %s: attempt %d", name, job_id, claim.attempt)
    outcome = _run_claimed(rt, claim)
    _retain(rt, job_id)
    return outcome


def _retain(rt: Runtime, job_id: uuid.UUID) -> None:
    """If the step ended the job: its data's retention, at once (the watchdog retries it if
    this fails or the worker dies first)."""
    try:
        apply_retention(rt.db, rt.store, rt.settings, job_id)
    except Exception:
        log.warning("job %s: retention failed; the watchdog tries again", job_id, exc_info=True)


def _run_claimed(rt: Runtime, claim: steps.Claim) -> str:
    job_id, name = claim.job_id, claim.step
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
        except ArtifactError as exc:  # another start may find the object (or the store) well
            log.warning("step %s of job %s: %s", name, job_id, exc)
            with rt.db.unit_of_work() as session:
                done = steps.step_retry(
                    session, claim, "artifact_error", f"{name}: {exc}", rt.settings, rt.queue
                )
            return done or "skipped"
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
    """The job's work directory on a local or shared artifact root:
    <artifact_root>/jobs/<job id> (a server-generated key)."""
    return local_path(settings.artifact_root) / "jobs" / str(job_id)


def job_spec(claim: steps.Claim) -> JobSpec:
    try:  # the library's rules again: a spec stored before a rule existed fails cleanly
        return JobSpec.model_validate(claim.spec)
    except ValidationError as exc:
        raise NegMergeError(describe_validation_error(exc)) from None


def load_context(
    rt: Runtime, claim: steps.Claim, root: Path | None = None, local: Path | None | bool = True
) -> JobContext:
    """The step's JobContext in work directory `root` (default: the job's on a local
    artifact root), on `local` weights (default: `local_weights`')."""
    spec = job_spec(claim)
    root = root or workdir_for(rt.settings, claim.job_id)
    Workdir(root).claim(spec)
    options = loader_options(rt.settings)
    if local is True:
        local = local_weights(rt, claim, root, spec)
    if local is None:
        return JobContext.load(spec, root, options)
    staged = spec.model_copy(
        update={"model": spec.model.model_copy(update={"weights": str(local)})}
    )
    ctx = JobContext.load(staged, root, options)
    if claim.step != steps.PREPARE:  # prepare hashes the local copy; the report names the URI
        ctx.spec = spec
    return ctx


def local_weights(
    rt: Runtime, claim: steps.Claim, root: Path, spec: JobSpec | None = None
) -> Path | None:
    """A local copy of the job's base weights for torch, or None if they are a local dense
    file already: a delta-stored version materialised (once per job on a local artifact
    root, per step in the scratch folder with an object store), or a store object or another
    fsspec URI staged in the step's scratch folder."""
    spec = spec or job_spec(claim)
    weights = spec.model.weights
    if weights is None:
        return None
    delta = version_store.delta_key_of(rt.store, weights)
    if delta is not None:
        version = _base_sha256(rt, claim)
        folder = root.parent / "inputs" if rt.store.remote else _base_folder(rt, claim.job_id)
        local = folder / f"{version}.safetensors"
        with store_errors():
            version_store.materialise_version(
                rt.store, delta, version, local, rt.settings.scratch_root
            )
        return local
    if not rt.store.remote or is_local(weights):
        return None
    # Weights in the object store (a version a job made) or another fsspec URI.
    local = root.parent / "inputs" / "weights.safetensors"
    stage_weights(rt.store, weights, local)
    return local


def _base_folder(rt: Runtime, job_id: uuid.UUID) -> Path:
    """Where a local artifact root's job keeps its materialised base until it finishes."""
    return Path(rt.settings.scratch_root) / "bases" / str(job_id)


def _base_sha256(rt: Runtime, claim: steps.Claim) -> str:
    """The sha256 of the job's base version (its materialised weights)."""
    with rt.db.unit_of_work() as session:
        job = JobRepository(session, claim.tenant_id).get(claim.job_id)
        version = (
            ModelRepository(session, claim.tenant_id).version_by_id(job.model_version_id)
            if job
            else None
        )
    if version is None:
        raise ArtifactError(f"job {claim.job_id}: its base version is gone")
    return version.weights_sha256


def loader_options(settings: Settings) -> LoaderOptions:
    """The fine-tuning data path the settings ask for (none of it changes a task vector)."""
    workers = settings.finetune_loader_workers
    return LoaderOptions(
        num_workers=None if workers == "auto" else workers,
        decoded_cache_bytes=settings.finetune_decoded_cache_mib * MiB,
        channels_last=settings.finetune_channels_last,
        compile=settings.finetune_compile,
    )


@dataclass(frozen=True)
class StepRun:
    """A claimed step ready to run: what its runner gets."""

    rt: Runtime
    claim: steps.Claim
    step: Step  # the claim's step name, taken apart
    root: Path  # the work directory
    staged: StagedStep | None  # with an object store: uploads the outputs before the record
    # A merge's running merge states and its variants' records (worker.merge_states).
    folded: tuple[list[MergeState] | None, list[VariantRecord] | None] = (None, None)


Runner = Callable[[StepRun], str]  # runs one kind of step; returns what happened (for logs)


def run_stage(rt: Runtime, claim: steps.Claim) -> str:
    """Run the claimed step with its kind's runner, in the job's work directory or, with an
    object store, in a scratch folder holding the step's files."""
    step = parse_step(claim.step)
    if step is None:  # claim_step only hands out the step table's steps
        raise ValueError(f"unknown step {claim.step!r}")
    runner = RUNNERS[step.kind.name]
    folded: tuple[list[MergeState] | None, list[VariantRecord] | None] = (None, None)
    if VARIANTS in step.kind.reads:  # the variants may have been folded into merge states
        folded = merge_states.current_states(
            rt.db.unit_of_work, claim.job_id, job_spec(claim), step.round
        )
    if not rt.store.remote:
        root = workdir_for(rt.settings, claim.job_id)
        return runner(StepRun(rt, claim, step, root, None, folded))
    files = files_of(claim.step, job_spec(claim), folded[0] is not None)
    with scratch_folder(rt.settings.scratch_root, claim.job_id, claim.step) as folder:
        staged = StagedStep(rt.store, folder / "work", claim.job_id, files)
        staged.download(rt.settings.scratch_max_bytes)
        return runner(StepRun(rt, claim, step, staged.folder, staged, folded))


def record(run: StepRun, output: Output) -> Output:
    """Upload the step's outputs (with an object store) and record it as DONE, its next steps
    sent; returns the output as recorded (its paths the store's URIs)."""
    stored = to_stored(output)
    if run.staged is not None:
        run.staged.upload()
        stored = run.staged.to_store_uris(stored)
    with run.rt.db.unit_of_work() as session:
        following = steps.complete_step(session, run.claim, stored, run.rt.queue)
    log.info("step %s of job %s: done; next %s", run.claim.step, run.claim.job_id, following)
    return type(output).model_validate(stored)


def run_prepare(run: StepRun) -> str:
    record(run, prepare(load_context(run.rt, run.claim, run.root)))
    return "done"


def run_finetune(run: StepRun) -> str:
    rt, claim = run.rt, run.claim
    ctx = load_context(rt, claim, run.root)
    progress = ProgressWriter(rt, claim.job_id, ctx.device)
    output = finetune_variant(ctx, run.step.number, progress.on_step)
    if merge_states.running_storage(rt.settings, ctx.spec):
        keep = bool(claim.request.get("keep_task_vectors", False))
        output = merge_states.fold(rt.store, rt.db.unit_of_work, claim.job_id, ctx, output, keep)
    output = record(run, output)
    if output.merge_state is not None:
        merge_states.settle(rt.store, rt.db.unit_of_work, claim.job_id, output.merge_state)
    return "done"


def run_merge(run: StepRun) -> str:
    rt, claim = run.rt, run.claim
    began = time.perf_counter()
    ctx = load_context(rt, claim, run.root)
    states, records = run.folded
    if states is not None:
        states = [merge_states.local_copy(rt.store, s.path, run.root, claim.job_id) for s in states]
    merged = merge_variants(ctx, run.step.round, states, records)
    output = record(run, merged.model_copy(update={"seconds": time.perf_counter() - began}))
    if not _keeps_task_vectors(claim):
        delete_task_vectors(rt.store, output)
    if not _merged_again(claim):
        group = job_spec(claim).state_group(output.variants[-1].index)
        merge_states.delete_states(rt.store, claim.job_id, workdir_for_states(rt, claim), group)
    return "done"


def run_search(run: StepRun) -> str:
    progress = ProgressWriter(run.rt, run.claim.job_id)
    ctx = load_context(run.rt, run.claim, run.root)
    record(run, search(ctx, progress.on_evaluation, run.step.round))
    return "done"


def _keeps_task_vectors(claim: steps.Claim) -> bool:
    """Whether the task vectors outlive their merge: asked for, or merged again later."""
    return bool(claim.request.get("keep_task_vectors", False)) or _merged_again(claim)


def _merged_again(claim: steps.Claim) -> bool:
    """Whether a later round with the `more` strategy may merge this round's variants again."""
    escalation = claim.spec.get("escalation") or {}
    return escalation.get("rounds", 0) > 0 and escalation.get("strategy", "more") == "more"


def workdir_for_states(rt: Runtime, claim: steps.Claim) -> Path:
    """Where a local artifact root keeps the job's merge states (unused with a store)."""
    return workdir_for(rt.settings, claim.job_id) if not rt.store.remote else Path()


def delete_task_vectors(store: ArtifactStore, merged: Merged) -> None:
    """The n task vectors are not needed once merged (their sha256 are in the report; a
    variant folded into a running merge state kept none)."""
    for variant in merged.variants:
        if variant.path is not None:
            merge_states.delete_artifact(store, variant.path)


def run_finalize(run: StepRun) -> str:
    rt, claim, root, staged, round_ = run.rt, run.claim, run.root, run.staged, run.step.round
    base = local_weights(rt, claim, root)
    ctx = load_context(rt, claim, root, base)
    original = Original.model_validate(claim.outputs[steps.PREPARE])
    merged = Merged.model_validate(claim.outputs[steps.round_step(steps.MERGE, round_)])
    searched = Searched.model_validate(claim.outputs[steps.round_step(steps.SEARCH, round_)])
    earlier = []  # the rounds before: in the last finalize's output
    if round_:
        last = claim.outputs[steps.round_step(steps.FINALIZE, round_ - 1)]
        earlier = [RoundSummary.model_validate(r) for r in last["rounds"]]
    timings = {"prepare": original.seconds, "merge": merged.seconds, "search": searched.seconds}
    report = finalize(ctx, original, merged, searched, timings, earlier)
    report_path = str(ctx.workdir.at_round(round_).report)
    if staged is not None:
        staged.upload()
        report_path = staged.to_store_uris(report_path)
    summary = {
        "report_path": report_path,
        "model_sha256": report.model.sha256 if report.model else None,
        "rounds": [r.to_dict() for r in report.rounds],
    }
    next_round = report.escalation.next_round
    if next_round is not None:
        variants = [i for i, _ in ctx.spec.round_variants(next_round)]
        with rt.db.unit_of_work() as session:
            steps.start_round(
                session, claim, summary, next_round, variants, report.verdict.reason, rt.queue
            )
        log.info("job %s: target not met in round %d; round %d", claim.job_id, round_, next_round)
        return "escalated"
    with rt.db.unit_of_work() as session:
        job = steps.held_job(session, claim)
        if job is None:
            return "skipped"
        # lambda 0 leaves the model as it was: no new version, and the verdict says why.
        model = None
        if report.model is not None:
            sha256 = report.model.sha256
            source = Path(report.model.path)
            parent = ModelRepository(session, job.tenant_id).version_by_id(job.model_version_id)
            on_parent = None
            if parent is not None and ctx.spec.finetuning != "linear":
                # A linearized checkpoint's tensors are not its parent's: always dense.
                parent_local = base or Path(ctx.spec.model.weights or "")
                on_parent = (parent.weights_uri, parent.weights_sha256, parent_local)
            stored = store_model(rt, job.model_id, source, sha256, on_parent)
            version = add_version(
                session,
                job.tenant_id,
                job.model_id,
                weights_uri=stored,
                weights_sha256=sha256,
                size_bytes=source.stat().st_size,
                parent_version_id=job.model_version_id,
                produced_by_job_id=job.id,
                actor=steps.WORKER,
                finetuning=ctx.spec.finetuning,
            )
            model = StoredVersion(
                model_id=job.model_id,
                version=version.version,
                version_id=version.id,
                weights_sha256=sha256,
            )
        result = job_result(report, model)
        steps.finish_job(session, claim, summary, result)
    if not claim.request.get("keep_task_vectors", False):
        delete_task_vectors(rt.store, merged)
    merge_states.delete_states(rt.store, claim.job_id, workdir_for_states(rt, claim))
    shutil.rmtree(_base_folder(rt, claim.job_id), ignore_errors=True)
    log.info(
        "job %s: SUCCEEDED, target %s, model version %s",
        claim.job_id,
        "met" if result.met else "NOT met",
        result.model.version if result.model else None,
    )
    return "done"


def runner_per_kind(runners: dict[str, Runner]) -> dict[str, Runner]:
    """`runners`, checked to name every kind of the step table and nothing else: a worker
    without a runner for some kind does not start."""
    missing, unknown = STEPS.keys() - runners.keys(), runners.keys() - STEPS.keys()
    if missing or unknown:
        raise RuntimeError(
            f"step runners: none for {sorted(missing)}; not in the step table: {sorted(unknown)}"
        )
    return runners


# The function that runs each kind of step (app.step_table).
RUNNERS = runner_per_kind(
    {
        PREPARE: run_prepare,
        FINETUNE: run_finetune,
        MERGE: run_merge,
        SEARCH: run_search,
        FINALIZE: run_finalize,
    }
)


def store_model(
    rt: Runtime,
    model_id: uuid.UUID,
    source: Path,
    sha256: str,
    parent: tuple[str, str, Path] | None = None,
) -> str:
    """Copy the unlearned model to <artifact_root>/models/<model id>/<sha256>.safetensors:
    content-addressed, so a second copy of the same bytes is the same object; or, on
    `parent` (its URI, sha256 and a local dense copy), as a sparse delta if that is smaller
    (app.version_store)."""
    with store_errors():
        delta = version_store.store_version(rt.store, rt.settings, model_id, source, sha256, parent)
    if delta is not None:
        return delta
    if rt.store.remote:
        key = f"models/{model_id}/{sha256}.safetensors"
        with store_errors():
            if not (rt.store.exists(key) and rt.store.recorded_sha256(key) == sha256):
                rt.store.put_file(source, key)
        return rt.store.uri(key)
    return str(_store_model_file(rt.settings, model_id, source, sha256))


def _store_model_file(settings: Settings, model_id: uuid.UUID, source: Path, sha256: str) -> Path:
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

    def __init__(self, rt: Runtime, job_id: uuid.UUID, device: str = "cpu") -> None:
        self.rt = rt
        self.job_id = job_id
        self.device = device  # the fine-tuning's, for its memory and utilisation
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

    def on_step(self, step: int, total: int, loss: float, images_per_second: float) -> None:
        now = time.monotonic()
        if now - self.last < self.rt.settings.progress_interval_seconds:
            return
        self.last = now
        rate, usage = float(images_per_second), device_usage(self.device)
        self._check(
            lambda session: steps.report_loss(session, self.job_id, float(loss), rate, usage)
        )

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
