"""Which running merge state is current: the database's record, not the files a worker wrote."""

from __future__ import annotations

import uuid

from app.db.base import utcnow
from app.db.repositories import StepRepository
from app.services import steps
from tests.app.jobs_driver import OWNER, submit


def state(worker: str, variants: list[int], path: str) -> dict:
    return {"group": 0, "worker": worker, "variants": variants, "path": path, "replaces": None}


def test_a_fold_whose_step_was_not_recorded_is_in_no_current_state(app, client, registered):
    job = uuid.UUID(submit(client, registered))
    db, settings, queue = app.state.db, app.state.settings, app.state.queue
    with db.unit_of_work() as session:
        claim = steps.claim_step(session, job, steps.PREPARE, OWNER, settings)
        variants = steps.complete_step(session, claim, {"metrics": {}, "seconds": 0.1}, queue)
    first, second = variants[:2]

    with db.unit_of_work() as session:  # worker a finishes the first variant
        claim = steps.claim_step(session, job, first, "a-task/0", settings)
        done = {"index": 0, "merge_state": state("a", [0], "a-1")}
        steps.complete_step(session, claim, done, queue)
    with db.unit_of_work() as session:  # a takes the second one and folds it (a-2)...
        held_by_a = steps.claim_step(session, job, second, "a-task2/0", settings)
        assert steps.merge_states(session, job, 0) == {"a": state("a", [0], "a-1")}
    # ... and is killed before recording it: its step's lease is taken over by b.
    with db.unit_of_work() as session:
        StepRepository(session).step(job, second).lease_expires_at = utcnow()
    with db.unit_of_work() as session:
        claim_b = steps.claim_step(session, job, second, "b-task/0", settings)
        assert claim_b is not None
    with db.unit_of_work() as session:  # a's late completion (a duplicate) is not recorded
        late = {"index": 1, "merge_state": state("a", [0, 1], "a-2")}
        assert steps.complete_step(session, held_by_a, late, queue) == []
        assert steps.merge_states(session, job, 0) == {"a": state("a", [0], "a-1")}
    with db.unit_of_work() as session:
        done = {"index": 1, "merge_state": state("b", [1], "b-1")}
        steps.complete_step(session, claim_b, done, queue)
    with db.unit_of_work() as session:
        current = steps.merge_states(session, job, 0)
        outputs = steps.variant_outputs(session, job)
    # Each variant is in exactly one current state: a-2, which held variant 1 too, is not one.
    assert current == {"a": state("a", [0], "a-1"), "b": state("b", [1], "b-1")}
    assert sorted(outputs) == [0, 1]
