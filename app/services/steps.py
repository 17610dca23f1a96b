"""A job's steps as rows: leases, the fan-out and fan-in, and what the watchdog repairs.

A Celery message says only "run step S of job J", and a message may arrive twice, late, or
never. Whether a step runs is decided here, in the database, under the job's row lock:

- claim: a worker takes the step's lease by compare-and-set (PENDING, or RUNNING with an
  expired lease -> RUNNING with its own lease). A duplicate finds the step held or done and
  does nothing. A message for a step nobody created (a merge before the variants are done)
  does nothing either.
- complete: the step is DONE and the next steps' rows are created in the same transaction;
  their messages are sent after it commits. What follows each kind of step is declared in
  the step table (app.step_table): prepare fans out one finetune:k per variant; the variant
  whose completion makes the count of DONE variants reach n creates merge (once: completions
  are serialised by the job's row lock, and merge's row is created only if absent).
- rounds (negmerge.escalation): a finalize whose target was not met may start the next round
  (start_round): more finetune:k rows, then merge@r, search@r and finalize@r.
- the watchdog: an expired lease (its worker died) puts the step back to PENDING and sends it
  again; after `step_max_attempts` starts the job is FAILED. Waiting steps whose message may
  have been lost are sent again.

Functions here change rows and register messages with `after_commit`; they never commit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import JobEvent, JobStage, JobState, JobStep, StepState, UnlearningJob
from app.db.repositories import JobRepository, StepRepository
from app.db.session import after_commit
from app.queue import JobQueue
from app.schemas.results import JobResult
from app.services.job_states import change_stage, change_state
from app.settings import Settings

# The step names come from the step table; MERGE, PREPARE and the name helpers are imported
# here too (the `as` marks them as such), where the worker and tests name the steps they claim.
from app.step_table import (
    FINALIZE,
    FIRST_STEP,
    SEARCH,
    STEPS,
    Follow,
    Step,
    parse_step,
    step_name,
    variant_index,
)
from app.step_table import MERGE as MERGE
from app.step_table import PREPARE as PREPARE
from app.step_table import finetune_step as finetune_step
from app.step_table import round_step as round_step
from app.step_table import stage_of as stage_of

log = logging.getLogger(__name__)

WORKER = "worker"
WATCHDOG = "watchdog"


def same_delivery_chain(held_by: str | None, owner: str) -> bool:
    """True if `owner` is a retry (by Celery, after a database error) of the task that holds
    the lease. Owners are "<task id>/<retry number>": a redelivered duplicate of a message
    has the same retry number as the original and is turned away."""
    if not held_by:
        return False
    held_task, _, held_retry = held_by.partition("/")
    task, _, retry = owner.partition("/")
    return (
        held_task == task
        and held_retry.isdigit()
        and retry.isdigit()
        and int(retry) > int(held_retry)
    )


@dataclass(frozen=True)
class Claim:
    """A step this worker holds: what it needs to run it."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    step: str
    owner: str
    attempt: int
    spec: dict[str, Any]
    request: dict[str, Any]
    variants_total: int
    # Earlier steps' outputs by step name (not the variants': they are in merge's).
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


def claim_step(
    session: Session, job_id: uuid.UUID, name: str, owner: str, settings: Settings
) -> Claim | None:
    """Take the lease of step `name` of job `job_id`, or None if it is not ours to run."""
    repo = StepRepository(session)
    job = repo.lock_job(job_id)
    parsed = parse_step(name)
    if job is None or job.state.is_terminal or parsed is None:
        return None
    if job.state is JobState.CANCELLING:
        change_state(session, job, JobState.CANCELLED, WORKER)
        return None
    now = utcnow()
    step = repo.step(job_id, name)
    if step is None:
        if name != FIRST_STEP:
            return None  # nobody enqueued this step: a stray message
        step = repo.add_step(
            JobStep(job_id=job_id, tenant_id=job.tenant_id, name=FIRST_STEP, sent_at=now)
        )
    if step.state not in (StepState.PENDING, StepState.RUNNING):
        return None
    retry = same_delivery_chain(step.lease_owner, owner)
    if (
        step.state is StepState.RUNNING
        and not retry
        and step.lease_expires_at is not None
        and step.lease_expires_at > now
    ):
        return None  # another worker holds it
    if not retry:
        if step.attempts >= settings.step_max_attempts:
            _attempts_exhausted(session, job, step)
            return None
        step.attempts += 1
    step.state = StepState.RUNNING
    step.lease_owner = owner
    step.lease_expires_at = now + timedelta(seconds=settings.step_lease_seconds)
    step.started_at = now
    if job.state is JobState.QUEUED:
        change_state(session, job, JobState.RUNNING, WORKER)
    if job.stage is not parsed.kind.stage:
        change_stage(session, job, parsed.kind.stage, WORKER)
        job.percent = max(job.percent, parsed.kind.starts_at)
    outputs = {
        s.name: s.output
        for s in repo.steps(job_id)
        if variant_index(s.name) is None and s.output is not None
    }
    return Claim(
        job_id=job.id,
        tenant_id=job.tenant_id,
        step=name,
        owner=owner,
        attempt=step.attempts,
        spec=job.spec,
        request=job.request,
        variants_total=job.variants_total,
        outputs=outputs,
    )


def _attempts_exhausted(session: Session, job: UnlearningJob, step: JobStep) -> None:
    message = (
        f"step {step.name} was started {step.attempts} times and never finished: the worker "
        "running it stopped (killed, out of memory, or cut off from the database)"
    )
    step.state = StepState.FAILED
    step.error = message
    step.lease_owner = step.lease_expires_at = None
    fail_job(session, job, "step_attempts_exhausted", message)


def fail_job(session: Session, job: UnlearningJob, code: str, message: str) -> None:
    """End `job` as FAILED with error {code, message} (unless it has ended already)."""
    if not job.state.is_terminal:
        change_state(session, job, JobState.FAILED, WORKER, error=(code, message[:4000]))


def _end_step(step: JobStep, state: StepState, now: datetime) -> None:
    """The step has ended in `state`: its lease is released."""
    step.state = state
    step.finished_at = now
    step.lease_owner = step.lease_expires_at = None


def _held(repo: StepRepository, claim: Claim) -> tuple[UnlearningJob | None, JobStep | None]:
    """The job (locked) and the step, if `claim` still holds the step's lease."""
    job = repo.lock_job(claim.job_id)
    step = repo.step(claim.job_id, claim.step)
    if step is None or step.state is not StepState.RUNNING or step.lease_owner != claim.owner:
        # The lease was lost (expired and taken over): the other worker records the step; its
        # outputs are the same bytes, so nothing is lost by dropping ours.
        log.warning("lost the lease of %s of job %s", claim.step, claim.job_id)
        return job, None
    return job, step


def _done(
    session: Session, repo: StepRepository, claim: Claim, output: dict[str, Any]
) -> UnlearningJob | None:
    """Record the held step `claim.step` as DONE with `output`; the job (locked) if it goes
    on, None if the lease was lost or the job has ended or is being cancelled."""
    job, step = _held(repo, claim)
    if job is None or step is None:
        return None
    _end_step(step, StepState.DONE, utcnow())
    step.output = output
    if job.state.is_terminal:
        return None
    if job.state is JobState.CANCELLING:
        change_state(session, job, JobState.CANCELLED, WORKER)
        return None
    return job


def complete_step(
    session: Session, claim: Claim, output: dict[str, Any], queue: JobQueue
) -> list[str]:
    """Record step `claim.step` as DONE with `output`, create the next steps and send them
    after commit. Returns the names of the steps it will send."""
    repo = StepRepository(session)
    job = _done(session, repo, claim, output)
    if job is None:
        return []
    now = job.updated_at = utcnow()

    step = _claimed(claim)
    kind = step.kind
    if step.variant is not None:
        done = repo.count_steps(job.id, kind.prefix, StepState.DONE)
        job.variants_done = done
        job.percent = kind.percent_after(done, job.variants_total)
        details = {"variants_done": done, "variants_total": job.variants_total}
        if output.get("device_usage"):  # the variant's GPU memory (and utilisation)
            details["device_usage"] = output["device_usage"]
        _progress_event(session, job, details, now)
    else:
        job.percent = max(job.percent, kind.percent_after())

    following: list[str] = []
    if kind.follow is Follow.EACH_VARIANT:
        following = [step_name(kind.then, k) for k in range(job.variants_total)]
    elif kind.follow is Follow.ALL_VARIANTS:
        # The fan-in: only the completion that makes the count reach n sees it, because
        # completions hold the job's row lock; the next step's row is created only if absent.
        # The round is the one in progress: as many rounds as finalize steps have started.
        current = step_name(kind.then, repo.count_steps(job.id, STEPS[FINALIZE].prefix))
        if job.variants_done >= job.variants_total and repo.step(job.id, current) is None:
            following = [current]
    elif kind.follow is Follow.SAME_ROUND:
        following = [step_name(kind.then, step.round)]
    _create_and_send(session, repo, job, following, now, queue)
    return following


def _claimed(claim: Claim) -> Step:
    step = parse_step(claim.step)
    assert step is not None  # claim_step hands out only the step table's steps
    return step


def _create_and_send(
    session: Session,
    repo: StepRepository,
    job: UnlearningJob,
    names: list[str],
    now: datetime,
    queue: JobQueue,
) -> None:
    """Create the rows of steps `names` (PENDING) and send them after commit."""
    for name in names:
        repo.add_step(JobStep(job_id=job.id, tenant_id=job.tenant_id, name=name, sent_at=now))
    if names:
        job_id = job.id
        after_commit(session, lambda: queue.send_steps(job_id, names))


def finish_job(
    session: Session, claim: Claim, output: dict[str, Any], result: JobResult
) -> UnlearningJob | None:
    """Record finalize as DONE and the job as SUCCEEDED with `result` (the caller has added
    the model version in the same transaction). None if the lease was lost."""
    repo = StepRepository(session)
    job, step = _held(repo, claim)
    if job is None or step is None:
        return None
    now = utcnow()
    _end_step(step, StepState.DONE, now)
    step.output = output
    if job.state.is_terminal:
        return None
    change_stage(session, job, JobStage.STORING, WORKER)
    job.percent = 100.0
    # CANCELLING -> SUCCEEDED: the work finished before the cancel could stop it.
    change_state(session, job, JobState.SUCCEEDED, WORKER, result=result)
    return job


def start_round(
    session: Session,
    claim: Claim,
    output: dict[str, Any],
    round_: int,
    variants: list[int],
    reason: str,
    queue: JobQueue,
) -> list[str]:
    """Record round `round_ - 1`'s finalize as DONE (its target was not met) and start round
    `round_`: its `variants` are created and sent after commit. [] if the lease was lost."""
    repo = StepRepository(session)
    job = _done(session, repo, claim, output)
    if job is None:
        return []
    now = job.updated_at = utcnow()
    job.variants_total += len(variants)
    then = STEPS[_claimed(claim).kind.then]  # Follow.NEXT_ROUND: the next round's variants
    job.percent = then.percent_after(job.variants_done, job.variants_total)
    change_stage(session, job, then.stage, WORKER)
    _progress_event(
        session,
        job,
        {"round": round_, "variants_total": job.variants_total, "reason": reason},
        now,
    )
    following = [step_name(then.name, k) for k in variants]
    _create_and_send(session, repo, job, following, now, queue)
    return following


def held_job(session: Session, claim: Claim) -> UnlearningJob | None:
    """The job, locked, if `claim` still holds its step (used before adding a model version)."""
    job, step = _held(StepRepository(session), claim)
    return job if step is not None and job is not None and not job.state.is_terminal else None


def step_cancelled(session: Session, claim: Claim) -> None:
    """The step stopped because the job is being cancelled: the job is CANCELLED."""
    repo = StepRepository(session)
    job, step = _held(repo, claim)
    if step is not None:
        _end_step(step, StepState.CANCELLED, utcnow())
    if job is not None and job.state is JobState.CANCELLING:
        change_state(session, job, JobState.CANCELLED, WORKER)


def step_failed(session: Session, claim: Claim, code: str, message: str) -> None:
    """The step failed for good (bad input, a bug): the job is FAILED with {code, message}."""
    repo = StepRepository(session)
    job, step = _held(repo, claim)
    if step is None or job is None:
        return
    _end_step(step, StepState.FAILED, utcnow())
    step.error = message
    fail_job(session, job, code, message)


def step_retry(
    session: Session, claim: Claim, code: str, message: str, settings: Settings, queue: JobQueue
) -> str | None:
    """The step failed for a reason another start may not meet (an artifact missing or
    corrupted in the store, the store unreachable): back to PENDING and sent again, like a
    step whose worker died, until `step_max_attempts` starts; then the job is FAILED with
    {code, message}. Returns what it did."""
    repo = StepRepository(session)
    job, step = _held(repo, claim)
    if step is None or job is None:
        return None
    step.error = message
    if step.attempts >= settings.step_max_attempts:
        _end_step(step, StepState.FAILED, utcnow())
        fail_job(session, job, code, f"{message} (step {step.name}, {step.attempts} attempts)")
        return "failed"
    step.state = StepState.PENDING
    step.lease_owner = step.lease_expires_at = None
    step.sent_at = utcnow()
    after_commit(session, lambda: queue.send_steps(claim.job_id, [claim.step]))
    return "retried"


def variant_outputs(session: Session, job_id: uuid.UUID) -> dict[int, dict[str, Any]]:
    """The outputs of the job's finished variants, by index."""
    return {
        index: s.output
        for s in StepRepository(session).steps(job_id)
        if (index := variant_index(s.name)) is not None
        and s.state is StepState.DONE
        and s.output is not None
    }


def merge_states(session: Session, job_id: uuid.UUID, group: int) -> dict[str, dict[str, Any]]:
    """The current running merge state of each worker of the job in state group `group`
    (negmerge.merge.running), by worker: the one its latest finished variant recorded, which
    holds all the variants it finished. A fold whose step was not recorded (a worker killed,
    a lease lost) is in none of them: its variant is folded again where it is run again."""
    current: dict[str, dict[str, Any]] = {}
    for output in variant_outputs(session, job_id).values():
        state = output.get("merge_state")
        if state is None or state["group"] != group:
            continue
        held = current.get(state["worker"])
        if held is None or len(state["variants"]) > len(held["variants"]):
            current[state["worker"]] = state
    return current


def renew_lease(session: Session, claim: Claim, settings: Settings) -> bool:
    until = utcnow() + timedelta(seconds=settings.step_lease_seconds)
    return StepRepository(session).renew_lease(claim.job_id, claim.step, claim.owner, until)


def report_loss(
    session: Session,
    job_id: uuid.UUID,
    loss: float,
    images_per_second: float | None = None,
    device_usage: dict[str, float] | None = None,
) -> JobState | None:
    """Write the current fine-tuning loss, training rate and device use (None on CPU);
    returns the job's state (the cancel flag)."""
    repo = StepRepository(session)
    repo.set_current_loss(job_id, loss, utcnow(), images_per_second, device_usage)
    return repo.job_state(job_id)


def lambda_evaluated(session: Session, job_id: uuid.UUID, lam: float) -> JobState | None:
    """Count one more lambda evaluated; returns the job's state (the cancel flag)."""
    job = StepRepository(session).lock_job(job_id)
    if job is None:
        return None
    job.lambdas_evaluated += 1
    job.percent = min(STEPS[SEARCH].percent_after() - 1.0, job.percent + 1.0)  # below finalize
    job.updated_at = utcnow()
    _progress_event(session, job, {"lambda": lam, "lambdas_evaluated": job.lambdas_evaluated})
    return job.state


# ---- the watchdog's repairs: each one its own short transaction ------------------------------


def _progress_event(
    session: Session, job: UnlearningJob, details: dict[str, Any], at: datetime | None = None
) -> None:
    """Append a progress event to the job's timeline (the events SSE will stream)."""
    event = JobEvent(
        job_id=job.id, kind="progress", state=job.state, stage=job.stage, details=details
    )
    if at is not None:
        event.at = at
    JobRepository(session, job.tenant_id).add_event(event)


def requeue_expired(
    session: Session, job_id: uuid.UUID, name: str, settings: Settings, queue: JobQueue
) -> str | None:
    """If step `name` of `job_id` is RUNNING with an expired lease: back to PENDING and sent
    again, or the job FAILED after too many attempts. Returns what it did."""
    repo = StepRepository(session)
    job = repo.lock_job(job_id)
    step = repo.step(job_id, name)
    now = utcnow()
    if (
        job is None
        or step is None
        or step.state is not StepState.RUNNING
        or step.lease_expires_at is None
        or step.lease_expires_at >= now
    ):
        return None  # changed since it was found
    if job.state.is_terminal:
        step.state = StepState.CANCELLED if job.state is JobState.CANCELLED else StepState.FAILED
        step.lease_owner = step.lease_expires_at = None
        return "closed"
    if job.state is JobState.CANCELLING:
        step.state = StepState.CANCELLED
        step.lease_owner = step.lease_expires_at = None
        change_state(session, job, JobState.CANCELLED, WATCHDOG)
        return "cancelled"
    if step.attempts >= settings.step_max_attempts:
        _attempts_exhausted(session, job, step)
        return "failed"
    step.state = StepState.PENDING
    step.lease_owner = step.lease_expires_at = None
    step.sent_at = now
    after_commit(session, lambda: queue.send_steps(job_id, [name]))
    return "requeued"


def resend_pending(
    session: Session, job_id: uuid.UUID, name: str, settings: Settings, queue: JobQueue
) -> bool:
    """Send a waiting step again if its last message is older than resend_after_seconds."""
    repo = StepRepository(session)
    job = repo.lock_job(job_id)
    step = repo.step(job_id, name)
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.resend_after_seconds)
    if job is None or job.state.is_terminal or step is None or step.state is not StepState.PENDING:
        return False
    if step.sent_at is not None and step.sent_at >= cutoff:
        return False
    step.sent_at = now
    after_commit(session, lambda: queue.send_steps(job_id, [name]))
    return True


def resend_first_step(
    session: Session, job_id: uuid.UUID, settings: Settings, queue: JobQueue
) -> bool:
    """A QUEUED job no worker has claimed: create its prepare row and send it again."""
    repo = StepRepository(session)
    job = repo.lock_job(job_id)
    if job is None or job.state is not JobState.QUEUED or repo.step(job_id, FIRST_STEP) is not None:
        return False
    _create_and_send(session, repo, job, [FIRST_STEP], utcnow(), queue)
    return True


def cancel_orphaned(session: Session, job_id: uuid.UUID, now: datetime) -> bool:
    """A CANCELLING job with no live lease left: nobody will notice the flag, so end it."""
    repo = StepRepository(session)
    job = repo.lock_job(job_id)
    if job is None or job.state is not JobState.CANCELLING:
        return False
    live = [
        s
        for s in repo.steps(job_id)
        if s.state is StepState.RUNNING
        and s.lease_expires_at is not None
        and s.lease_expires_at >= now
    ]
    if live:
        return False
    change_state(session, job, JobState.CANCELLED, WATCHDOG)
    return True
