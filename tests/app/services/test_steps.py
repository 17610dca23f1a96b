"""The step table (app.step_table) and the step state machine (app.services.steps) against
the real PostgreSQL and Redis, without Celery workers: each "worker" here is a call of the
functions a worker makes, in its own unit of work, and the messages they send are read back
from the Redis lists the broker keeps.

A job is submitted through the API (tests/app/conftest.py); its steps are then claimed,
completed, lost, repeated and retried in the orders a real deployment can produce.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis

from app import step_table
from app.db.base import utcnow
from app.db.models import JobStage, JobState, JobStep, StepState, UnlearningJob
from app.db.session import Database
from app.queue import JobQueue
from app.schemas.results import JobResult
from app.services import steps
from app.settings import Settings
from app.step_table import STEPS, Follow, Naming, Queue, parse_step, step_name
from tests.app.jobs_driver import submit


class SentSteps:
    """A JobQueue on queues of its own, and the (job id, step) of every message it sent."""

    def __init__(self, settings: Settings, redis_client: redis.Redis) -> None:
        run = secrets.token_hex(4)
        self.settings = settings.model_copy(
            update={"queue_name": f"negmerge-steps-{run}", "gpu_queue_name": f"gpu-steps-{run}"}
        )
        self.queue = JobQueue(self.settings)
        self.redis = redis_client

    def names(self) -> list[str]:
        return [self.settings.queue_name, self.settings.gpu_queue_name]

    def take(self) -> list[tuple[str, str, str]]:
        """(queue, job id, step) of each message sent since the last take, oldest first."""
        sent = []
        for name in self.names():
            while (raw := self.redis.rpop(name)) is not None:
                body = json.loads(base64.b64decode(json.loads(raw)["body"]))
                job_id, step = body[0]
                sent.append((name, job_id, step))
        return sent

    def close(self) -> None:
        for name in self.names():
            self.redis.delete(name, f"_kombu.binding.{name}")
        self.queue.close()


@pytest.fixture
def sent(settings: Settings, redis_client: redis.Redis) -> Iterator[SentSteps]:
    queue = SentSteps(settings, redis_client)
    yield queue
    queue.close()


@pytest.fixture
def job_id(app, client, registered) -> uuid.UUID:  # type: ignore[no-untyped-def]
    return uuid.UUID(submit(client, registered))


LEASE = 60.0


@pytest.fixture
def config(settings: Settings) -> Settings:
    return settings.model_copy(update={"step_lease_seconds": LEASE, "step_max_attempts": 3})


def claim(db: Database, job_id: uuid.UUID, step: str, owner: str, config: Settings):  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        return steps.claim_step(session, job_id, step, owner, config)


def complete(db: Database, held: steps.Claim, queue: JobQueue, output: dict | None = None):  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        return steps.complete_step(session, held, output or {"by": held.owner}, queue)


def row(db: Database, job_id: uuid.UUID, step: str) -> JobStep:
    with db.unit_of_work() as session:
        found = session.query(JobStep).filter_by(job_id=job_id, name=step).one()
        session.expunge(found)
        return found


def job(db: Database, job_id: uuid.UUID) -> UnlearningJob:
    with db.unit_of_work() as session:
        found = session.get(UnlearningJob, job_id)
        assert found is not None
        session.expunge(found)
        return found


def expire_lease(db: Database, job_id: uuid.UUID, step: str) -> None:
    """The holder's lease runs out (its worker died): as the clock would do it."""
    with db.unit_of_work() as session:
        found = session.query(JobStep).filter_by(job_id=job_id, name=step).one()
        found.lease_expires_at = utcnow() - timedelta(seconds=1)


def run_variants(db: Database, job_id: uuid.UUID, queue: JobQueue, config: Settings) -> None:
    held = claim(db, job_id, steps.PREPARE, "w/0", config)
    for name in complete(db, held, queue):
        complete(db, claim(db, job_id, name, f"{name}/0", config), queue)


# ---- pure functions --------------------------------------------------------------------------


def test_a_retry_of_the_holding_task_is_the_same_chain_and_a_redelivery_is_not():
    assert steps.same_delivery_chain("task-a/0", "task-a/1")  # Celery retried the task
    assert steps.same_delivery_chain("task-a/1", "task-a/3")
    assert not steps.same_delivery_chain("task-a/0", "task-a/0")  # the message delivered again
    assert not steps.same_delivery_chain("task-a/1", "task-a/0")  # an older retry, late
    assert not steps.same_delivery_chain("task-a/0", "task-b/1")  # another message
    assert not steps.same_delivery_chain(None, "task-a/1")
    assert not steps.same_delivery_chain("", "task-a/1")
    assert not steps.same_delivery_chain("task-a", "task-a/1")  # no retry number held
    assert not steps.same_delivery_chain("task-a/x", "task-a/1")


# ---- the step table ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "stage", "queue", "starts_at", "ends_at"),
    [
        (step_table.PREPARE, JobStage.PREPARING, Queue.CPU, 0.0, 10.0),
        (step_table.FINETUNE, JobStage.FINETUNING, Queue.GPU, 10.0, 80.0),
        (step_table.MERGE, JobStage.MERGING, Queue.CPU, 80.0, 85.0),
        (step_table.SEARCH, JobStage.SEARCHING, Queue.CPU, 85.0, 95.0),
        (step_table.FINALIZE, JobStage.EVALUATING, Queue.CPU, 95.0, 100.0),
    ],
)
def test_each_kind_runs_in_its_stage_and_queue_over_its_share_of_the_progress(
    kind, stage, queue, starts_at, ends_at, sent
):
    declared = STEPS[kind]
    assert (declared.stage, declared.queue) == (stage, queue)
    assert (declared.starts_at, declared.percent_after()) == (starts_at, ends_at)
    name = step_name(kind, 1 if declared.naming is not Naming.ONCE else 0)
    assert steps.stage_of(name) is stage
    on_gpu = sent.queue.queue_for(name) == sent.settings.gpu_queue_name
    assert on_gpu == (queue is Queue.GPU)


def test_a_per_variant_kind_shares_its_progress_among_the_variants():
    finetune = STEPS[step_table.FINETUNE]
    assert finetune.percent_after(0, 4) == 10.0
    assert finetune.percent_after(1, 4) == pytest.approx(27.5)
    assert finetune.percent_after(4, 4) == 80.0


@pytest.mark.parametrize(
    ("kind", "then", "follow"),
    [
        (step_table.PREPARE, step_table.FINETUNE, Follow.EACH_VARIANT),
        (step_table.FINETUNE, step_table.MERGE, Follow.ALL_VARIANTS),
        (step_table.MERGE, step_table.SEARCH, Follow.SAME_ROUND),
        (step_table.SEARCH, step_table.FINALIZE, Follow.SAME_ROUND),
        (step_table.FINALIZE, step_table.FINETUNE, Follow.NEXT_ROUND),
    ],
)
def test_each_kind_says_what_follows_it(kind, then, follow):
    assert (STEPS[kind].then, STEPS[kind].follow) == (then, follow)


def test_the_steps_from_the_first_reach_every_kind_each_starting_where_the_last_ended():
    order, kind = [], STEPS[step_table.FIRST_STEP]
    while kind.name not in order:
        order.append(kind.name)
        following = STEPS[kind.then]
        if kind.follow is not Follow.NEXT_ROUND:  # a new round goes back: its share again
            assert following.starts_at == kind.percent_after()
        kind = following
    assert order == ["prepare", "finetune", "merge", "search", "finalize"]
    assert sorted(order) == sorted(STEPS)
    assert STEPS[order[0]].starts_at == 0.0 and STEPS[order[-1]].percent_after() == 100.0
    assert all(k.then != step_table.FIRST_STEP for k in STEPS.values())  # it runs once


@pytest.mark.parametrize(
    ("kind", "number", "name", "round_", "variant"),
    [
        (step_table.PREPARE, 0, "prepare", 0, None),
        (step_table.FINETUNE, 0, "finetune:0", 0, 0),
        (step_table.FINETUNE, 12, "finetune:12", 0, 12),
        (step_table.MERGE, 0, "merge", 0, None),
        (step_table.SEARCH, 1, "search@1", 1, None),
        (step_table.FINALIZE, 3, "finalize@3", 3, None),
    ],
)
def test_step_names_on_the_wire_and_back(kind, number, name, round_, variant):
    assert step_name(kind, number) == name
    parsed = parse_step(name)
    assert parsed is not None and parsed.kind is STEPS[kind] and parsed.name == name
    assert (parsed.number, parsed.round, parsed.variant) == (number, round_, variant)
    assert steps.variant_index(name) == variant


@pytest.mark.parametrize(
    "name",
    [
        "bogus",
        "finetune",  # a variant's step names its variant
        "finetune:x",
        "finetune:-1",
        "finetune: 3",
        "finetune:03",  # one spelling of each name
        "merge@0",  # round 0 is "merge"
        "merge@03",
        "search@",
        "finalize@x",
        "prepare@1",  # prepare runs once
        "prepare:1",
        "merge:1",
        "finetune@1",
    ],
)
def test_names_of_no_step_parse_to_none_and_have_no_stage(name):
    assert parse_step(name) is None
    assert steps.stage_of(name) is None and steps.variant_index(name) is None


def test_a_step_run_once_has_no_numbered_name():
    with pytest.raises(ValueError, match="runs once"):
        step_name(step_table.PREPARE, 1)
    assert steps.round_step(steps.MERGE, 2) == "merge@2"
    assert steps.finetune_step(7) == "finetune:7"


# ---- claims and leases -----------------------------------------------------------------------


def test_a_claim_takes_the_lease_and_moves_the_job(db, job_id, config):
    before = utcnow()
    held = claim(db, job_id, steps.PREPARE, "task-1/0", config)
    assert held is not None
    assert (held.step, held.owner, held.attempt, held.job_id) == ("prepare", "task-1/0", 1, job_id)
    assert held.variants_total == job(db, job_id).variants_total > 0
    step = row(db, job_id, steps.PREPARE)
    assert step.state is StepState.RUNNING and step.lease_owner == "task-1/0"
    assert before + timedelta(seconds=LEASE - 5) < step.lease_expires_at
    assert step.lease_expires_at <= utcnow() + timedelta(seconds=LEASE)
    found = job(db, job_id)
    assert found.state is JobState.RUNNING and found.stage is JobStage.PREPARING


def test_a_held_lease_turns_away_other_workers_and_duplicate_deliveries(db, job_id, config):
    assert claim(db, job_id, steps.PREPARE, "task-1/0", config) is not None
    assert claim(db, job_id, steps.PREPARE, "task-2/0", config) is None  # another worker
    assert claim(db, job_id, steps.PREPARE, "task-1/0", config) is None  # the same message again
    step = row(db, job_id, steps.PREPARE)
    assert (step.lease_owner, step.attempts) == ("task-1/0", 1)


def test_a_celery_retry_of_the_holder_takes_the_lease_without_spending_an_attempt(
    db, job_id, config
):
    assert claim(db, job_id, steps.PREPARE, "task-1/0", config) is not None
    retried = claim(db, job_id, steps.PREPARE, "task-1/1", config)
    assert retried is not None and retried.attempt == 1
    step = row(db, job_id, steps.PREPARE)
    assert (step.lease_owner, step.attempts) == ("task-1/1", 1)


def test_an_expired_lease_is_taken_over_and_counts_an_attempt(db, job_id, config):
    assert claim(db, job_id, steps.PREPARE, "task-1/0", config) is not None
    expire_lease(db, job_id, steps.PREPARE)
    taken = claim(db, job_id, steps.PREPARE, "task-2/0", config)
    assert taken is not None and taken.attempt == 2
    assert row(db, job_id, steps.PREPARE).lease_owner == "task-2/0"


def test_the_last_attempt_running_out_fails_the_job(db, job_id, config):
    for attempt in range(1, config.step_max_attempts + 1):
        held = claim(db, job_id, steps.PREPARE, f"task-{attempt}/0", config)
        assert held is not None and held.attempt == attempt
        expire_lease(db, job_id, steps.PREPARE)
    assert claim(db, job_id, steps.PREPARE, "task-last/0", config) is None
    step = row(db, job_id, steps.PREPARE)
    assert step.state is StepState.FAILED and step.lease_owner is None
    found = job(db, job_id)
    assert found.state is JobState.FAILED
    assert found.error_code == "step_attempts_exhausted"
    assert "started 3 times" in found.error_message


def test_stray_messages_claim_nothing(db, job_id, config):
    assert claim(db, job_id, steps.MERGE, "early/0", config) is None  # nobody created it
    assert claim(db, job_id, "finetune:0", "early/0", config) is None
    assert claim(db, job_id, "bogus", "early/0", config) is None
    assert claim(db, uuid.uuid4(), steps.PREPARE, "other/0", config) is None  # no such job
    with db.unit_of_work() as session:
        assert session.query(JobStep).filter_by(job_id=job_id).count() == 0
    assert job(db, job_id).state is JobState.QUEUED


def test_a_claim_on_a_cancelling_job_cancels_it(db, client, registered, job_id, config):
    assert claim(db, job_id, steps.PREPARE, "task-1/0", config) is not None
    answer = client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=registered.caller.headers)
    assert answer.status_code == 200 and answer.json()["state"] == "CANCELLING", answer.text
    expire_lease(db, job_id, steps.PREPARE)
    assert claim(db, job_id, steps.PREPARE, "task-2/0", config) is None
    assert job(db, job_id).state is JobState.CANCELLED


# ---- completion, the fan-out and the fan-in ----------------------------------------------


def test_prepare_fans_out_one_step_per_variant_sent_after_commit(db, job_id, config, sent):
    held = claim(db, job_id, steps.PREPARE, "task-1/0", config)
    total = held.variants_total
    with db.unit_of_work() as session:
        following = steps.complete_step(session, held, {"metrics": {}}, sent.queue)
        assert sent.take() == []  # nothing leaves before the rows are committed
    assert following == [steps.finetune_step(k) for k in range(total)]
    assert sent.take() == [(sent.settings.gpu_queue_name, str(job_id), s) for s in following]
    step = row(db, job_id, steps.PREPARE)
    assert step.state is StepState.DONE and step.output == {"metrics": {}}
    assert step.lease_owner is None and step.finished_at is not None
    for name in following:
        assert row(db, job_id, name).state is StepState.PENDING
    assert job(db, job_id).percent == 10.0


def test_a_rolled_back_completion_sends_nothing(db, job_id, config, sent):
    held = claim(db, job_id, steps.PREPARE, "task-1/0", config)
    with pytest.raises(RuntimeError), db.unit_of_work() as session:
        steps.complete_step(session, held, {}, sent.queue)
        raise RuntimeError("the worker's transaction failed")
    assert sent.take() == []
    assert row(db, job_id, steps.PREPARE).state is StepState.RUNNING  # still held: retried


def test_only_the_last_variant_to_finish_creates_merge_once(db, job_id, config, sent):
    held = claim(db, job_id, steps.PREPARE, "p/0", config)
    variants = complete(db, held, sent.queue)
    sent.take()
    claims = [claim(db, job_id, name, f"{name}/0", config) for name in variants]
    for done, held in enumerate(claims[:-1], start=1):
        assert complete(db, held, sent.queue) == []
        found = job(db, job_id)
        assert found.variants_done == done
        assert found.percent == pytest.approx(10.0 + 70.0 * done / len(variants))
    assert complete(db, claims[-1], sent.queue) == [steps.MERGE]
    assert sent.take() == [(sent.settings.queue_name, str(job_id), steps.MERGE)]
    # A duplicate delivery of a finished variant claims nothing and creates nothing.
    assert claim(db, job_id, variants[0], f"{variants[0]}/0", config) is None
    assert complete(db, claims[-1], sent.queue) == []  # a second completion: not held any more
    with db.unit_of_work() as session:
        assert session.query(JobStep).filter_by(job_id=job_id, name=steps.MERGE).count() == 1
    assert sent.take() == []


def test_a_worker_that_lost_its_lease_records_nothing(db, job_id, config, sent):
    slow = claim(db, job_id, steps.PREPARE, "slow/0", config)
    expire_lease(db, job_id, steps.PREPARE)
    fast = claim(db, job_id, steps.PREPARE, "fast/0", config)
    assert complete(db, slow, sent.queue, {"by": "slow"}) == []
    step = row(db, job_id, steps.PREPARE)
    assert step.state is StepState.RUNNING and step.lease_owner == "fast/0"
    assert sent.take() == []
    assert complete(db, fast, sent.queue, {"by": "fast"})  # the variants
    assert row(db, job_id, steps.PREPARE).output == {"by": "fast"}


def test_merge_search_and_finalize_follow_each_other_to_success(db, job_id, config, sent):
    run_variants(db, job_id, sent.queue, config)
    merge = claim(db, job_id, steps.MERGE, "m/0", config)
    found = job(db, job_id)
    assert (found.stage, found.percent) == (JobStage.MERGING, STEPS[steps.MERGE].starts_at)
    assert complete(db, merge, sent.queue) == [steps.SEARCH]
    assert job(db, job_id).percent == STEPS[steps.MERGE].percent_after()  # its share is done
    search = claim(db, job_id, steps.SEARCH, "s/0", config)
    assert job(db, job_id).percent == STEPS[steps.SEARCH].starts_at
    assert complete(db, search, sent.queue, {"lambda": 0.5}) == [steps.FINALIZE]
    final = claim(db, job_id, steps.FINALIZE, "f/0", config)
    assert final.outputs[steps.SEARCH] == {"lambda": 0.5}  # earlier outputs come with it
    assert not any(name.startswith("finetune:") for name in final.outputs)
    with db.unit_of_work() as session:
        assert steps.finish_job(session, final, {"report_path": "r"}, JobResult(lambda_=0.5))
    found = job(db, job_id)
    assert (found.state, found.stage, found.percent) == (JobState.SUCCEEDED, None, 100)
    assert JobResult.of(found.result).lambda_ == 0.5
    assert found.result["lambda"] == 0.5  # stored by alias, as the API shows it
    assert claim(db, job_id, steps.FINALIZE, "f/1", config) is None  # the job has ended


def test_a_further_round_adds_variants_then_its_own_merge_search_and_finalize(
    db, job_id, config, sent
):
    run_variants(db, job_id, sent.queue, config)
    first = job(db, job_id).variants_total
    for name in (steps.MERGE, steps.SEARCH):
        complete(db, claim(db, job_id, name, f"{name}/0", config), sent.queue)
    final = claim(db, job_id, steps.FINALIZE, "f/0", config)
    sent.take()
    new = [first, first + 1]
    with db.unit_of_work() as session:
        following = steps.start_round(
            session, final, {"rounds": [{}]}, 1, new, "target not met", sent.queue
        )
    assert following == [steps.finetune_step(k) for k in new]
    assert [s for _, _, s in sent.take()] == following
    found = job(db, job_id)
    assert found.variants_total == first + 2 and found.stage is JobStage.FINETUNING
    assert found.percent == pytest.approx(10.0 + 70.0 * first / (first + 2))
    assert row(db, job_id, steps.FINALIZE).state is StepState.DONE

    claims = [claim(db, job_id, name, f"{name}/0", config) for name in following]
    assert complete(db, claims[0], sent.queue) == []
    assert complete(db, claims[1], sent.queue) == ["merge@1"]  # round 0's merge exists already
    merge = claim(db, job_id, "merge@1", "m1/0", config)
    assert complete(db, merge, sent.queue) == ["search@1"]
    search = claim(db, job_id, "search@1", "s1/0", config)
    assert complete(db, search, sent.queue) == ["finalize@1"]
    final = claim(db, job_id, "finalize@1", "f1/0", config)
    assert final.outputs[steps.FINALIZE] == {"rounds": [{}]}  # round 0's, for the report


def test_completing_a_step_of_a_cancelling_job_cancels_it_and_sends_nothing(
    db, client, registered, job_id, config, sent
):
    held = claim(db, job_id, steps.PREPARE, "task-1/0", config)
    answer = client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=registered.caller.headers)
    assert answer.json()["state"] == "CANCELLING", answer.text
    assert complete(db, held, sent.queue) == []
    assert row(db, job_id, steps.PREPARE).state is StepState.DONE
    assert job(db, job_id).state is JobState.CANCELLED
    assert sent.take() == []


# ---- failures, retries and the watchdog's repairs --------------------------------------------


def test_a_retried_step_goes_back_to_pending_until_its_attempts_run_out(db, job_id, config, sent):
    for attempt in range(1, config.step_max_attempts):
        held = claim(db, job_id, steps.PREPARE, f"t{attempt}/0", config)
        with db.unit_of_work() as session:
            did = steps.step_retry(session, held, "artifact_error", "gone", config, sent.queue)
        assert did == "retried"
        assert row(db, job_id, steps.PREPARE).state is StepState.PENDING
        assert sent.take() == [(sent.settings.queue_name, str(job_id), steps.PREPARE)]
    held = claim(db, job_id, steps.PREPARE, "last/0", config)
    with db.unit_of_work() as session:
        did = steps.step_retry(session, held, "artifact_error", "gone", config, sent.queue)
    assert did == "failed" and sent.take() == []
    found = job(db, job_id)
    assert found.state is JobState.FAILED and found.error_code == "artifact_error"
    assert "(step prepare, 3 attempts)" in found.error_message


def test_the_watchdog_requeues_an_expired_lease_and_leaves_a_live_one(db, job_id, config, sent):
    assert claim(db, job_id, steps.PREPARE, "dead/0", config) is not None
    with db.unit_of_work() as session:
        assert steps.requeue_expired(session, job_id, steps.PREPARE, config, sent.queue) is None
    expire_lease(db, job_id, steps.PREPARE)
    with db.unit_of_work() as session:
        did = steps.requeue_expired(session, job_id, steps.PREPARE, config, sent.queue)
    assert did == "requeued"
    step = row(db, job_id, steps.PREPARE)
    assert step.state is StepState.PENDING and step.lease_owner is None and step.attempts == 1
    assert sent.take() == [(sent.settings.queue_name, str(job_id), steps.PREPARE)]
    again = claim(db, job_id, steps.PREPARE, "alive/0", config)
    assert again is not None and again.attempt == 2


def test_a_failed_step_fails_the_job_and_later_steps_claim_nothing(db, job_id, config, sent):
    held = claim(db, job_id, steps.PREPARE, "t/0", config)
    with db.unit_of_work() as session:
        steps.step_failed(session, held, "data_error", "an image could not be decoded")
    found = job(db, job_id)
    assert found.state is JobState.FAILED and found.error_code == "data_error"
    assert row(db, job_id, steps.PREPARE).state is StepState.FAILED
    assert claim(db, job_id, steps.PREPARE, "t/1", config) is None
    assert complete(db, held, sent.queue) == [] and sent.take() == []
