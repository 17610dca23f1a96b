"""A job request is checked completely before it is accepted: every size within the
operator's bounds, no number that is not finite, a lambda grid the search can run on. Each
refusal is a 422 naming the field, the value and the limit, and queues nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db.models import UnlearningJob
from app.main import create_app
from tests.app.conftest import job_body

JOBS = "/v1/unlearning-jobs"


def refused(response, field: str, *words: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["fields"][0]["field"] == field, error
    for word in words:
        assert word in error["message"], error
    return error


def jobs_in(db, registered) -> int:  # type: ignore[no-untyped-def]
    """Jobs on the test's own model (the session's database holds other tests' jobs too)."""
    model_id = uuid.UUID(registered.model_id)
    with db.unit_of_work() as session:
        return session.scalar(
            select(func.count())
            .select_from(UnlearningJob)
            .where(UnlearningJob.model_id == model_id)
        )


@pytest.mark.parametrize(
    ("variants", "field", "words"),
    [
        (
            {"preset": "tiny-classifier", "base": {"epochs": 1e9}},
            "variants.base.epochs",
            ("1000000000 is more than the limit of 100", "NEGMERGE_MAX_EPOCHS"),
        ),
        (
            {"preset": "tiny-classifier", "base": {"steps": 1e12}},
            "variants.base.steps",
            ("1000000000000 is more than the limit of 100000", "NEGMERGE_MAX_STEPS"),
        ),
        (
            {"preset": "tiny-classifier", "base": {"batch_size": 1e9}},
            "variants.base.batch_size",
            ("1000000000 is more than the limit of 1024", "NEGMERGE_MAX_BATCH_SIZE"),
        ),
        (
            {"preset": "tiny-classifier", "base": {"warmup_steps": 1e12}},
            "variants.base.warmup_steps",
            ("1000000000000 is more than the limit of 10000", "NEGMERGE_MAX_WARMUP_STEPS"),
        ),
        (
            {"preset": "tiny-classifier", "grid": {"epochs": [1, 500]}},
            "variants.grid.epochs",
            ("500 is more than the limit of 100",),
        ),
        (
            {"preset": "tiny-classifier", "grid": {"augment": ["rand-m9-n2", "rand-m9-n5000"]}},
            "variants.grid.augment",
            ("5000 operations is more than the limit of 10 ", "NEGMERGE_MAX_AUGMENT_LAYERS"),
        ),
        (
            {"base": {"lr": 0.01}, "grid": {"weight_decay": [i / 1000 for i in range(65)]}},
            "variants",
            ("65 variants is more than the limit of 64 ", "NEGMERGE_MAX_VARIANTS"),
        ),
        (
            # 11 variants of 100,000 steps each: every one in bounds, the job not.
            {"base": {"steps": 100_000}, "grid": {"weight_decay": [i / 100 for i in range(11)]}},
            "variants",
            ("1100000 optimizer steps", "limit of 1000000", "NEGMERGE_MAX_TOTAL_STEPS"),
        ),
    ],
)
def test_each_size_of_the_variants_is_bounded(client, registered, db, variants, field, words):
    body = job_body(registered, variants=variants)
    response = client.post(JOBS, json=body, headers=registered.caller.headers)
    refused(response, field, *words)
    assert jobs_in(db, registered) == 0


def test_epochs_count_as_batches_of_the_forget_set(client, registered):
    # 2 forget samples in training: 2 epochs of batch 1 are 4 steps per variant (within bounds).
    body = job_body(registered, variants={"base": {"epochs": 2, "batch_size": 1}})
    response = client.post(JOBS, json=body, headers=registered.caller.headers)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("grid", "words"),
    [
        (
            [round(i / 1000, 3) for i in range(1001)],
            ("1001 points is more than the limit of 1000 "),
        ),
        (
            [0, 0.5, 1e300],
            ("1e+300 (its largest lambda) is more than the limit of 10.0", "NEGMERGE_MAX_LAMBDA"),
        ),
        ([-1000, 1e300], ("must start at 0",)),
        ([0.1, 0.5], ("must start at 0",)),
        ([0, 0.5, 0.25], ("increasing", "0.25 follows 0.5")),
        ([0, 0.5, 0.5], ("without repeats",)),
        ([], ("at least 1",)),
    ],
)
def test_the_lambda_grid_is_checked_at_submission(client, registered, db, grid, words):
    body = job_body(registered, search={"grid": grid})
    response = client.post(JOBS, json=body, headers=registered.caller.headers)
    refused(response, "search.grid", *words)
    assert jobs_in(db, registered) == 0


def post_raw(client: TestClient, registered, text: str):  # type: ignore[no-untyped-def]
    return client.post(
        JOBS,
        content=text,
        headers={**registered.caller.headers, "Content-Type": "application/json"},
    )


LR = {"variants": {"preset": "tiny-classifier", "base": {"lr": "@"}}}
CONSENSUS = {"merge": {"method": "negmerge", "params": {"consensus": "@"}}}


@pytest.mark.parametrize(
    ("changes", "literal", "field"),
    [
        ({"search": {"grid": ["@", 0.5]}}, "NaN", "search.grid.0"),
        ({"search": {"grid": [0, "@"]}}, "Infinity", "search.grid.1"),
        (LR, "1e309", "variants.base.lr"),
        (LR, "-Infinity", "variants.base.lr"),
        ({"search": {"retain_ratio": "@"}}, "NaN", "search.retain_ratio"),
        (CONSENSUS, "NaN", "merge.params.consensus"),
    ],
)
def test_numbers_that_are_not_finite_are_refused(client, registered, db, changes, literal, field):
    """json.loads reads NaN and Infinity, and 1e309 as infinity; none of them is a number a
    job can run with (or PostgreSQL store in JSON)."""
    text = json.dumps(job_body(registered, **changes)).replace('"@"', literal)
    refused(post_raw(client, registered, text), field, "must be a finite number")
    assert jobs_in(db, registered) == 0


def test_non_finite_numbers_are_refused_on_other_endpoints_too(client, caller, weights_file):
    from tests.app.conftest import model_body

    body = {**model_body(weights_file), "init_args": {"drop_rate": "@"}}
    response = client.post(
        "/v1/models",
        content=json.dumps(body).replace('"@"', "NaN"),
        headers={**caller.headers, "Content-Type": "application/json"},
    )
    refused(response, "init_args.drop_rate", "must be a finite number")


@pytest.fixture
def bounded_client(app, settings, db) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """A second app on the same database, with an operator's tighter bounds."""
    tight = settings.model_copy(
        update={"max_epochs": 1, "max_eval_samples": 100, "max_variants": 3, "max_lambda": 0.5}
    )
    bounded = create_app(tight)
    with TestClient(bounded, raise_server_exceptions=False) as test_client:
        yield test_client
    bounded.state.db.dispose()


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({}, "variants", ("4 variants is more than the limit of 3 ",)),
        (
            {
                "variants": {"preset": "tiny-classifier", "grid": {"augment": ["rand-m9-n2"]}},
                "max_eval_samples": 50,
            },
            "variants.preset",  # tiny-classifier's epochs: 5
            ("5 is more than the limit of 1", "NEGMERGE_MAX_EPOCHS"),
        ),
        (
            {
                "variants": {"base": {"epochs": 1}},
                "search": {"grid": [0, 0.5]},
                "max_eval_samples": 101,
            },
            "max_eval_samples",
            ("101 is more than the limit of 100",),
        ),
        (
            {"variants": {"base": {"epochs": 1}}, "max_eval_samples": 50},
            "search.grid",  # the default grid, 0 to 2
            ("2 (its largest lambda) is more than the limit of 0.5",),
        ),
    ],
)
def test_the_bounds_are_the_operators_settings(bounded_client, registered, changes, field, words):
    response = bounded_client.post(
        JOBS, json=job_body(registered, **changes), headers=registered.caller.headers
    )
    refused(response, field, *words)


def test_a_job_within_the_tighter_bounds_is_accepted(bounded_client, registered):
    body = job_body(
        registered,
        variants={"base": {"epochs": 1}},
        search={"grid": [0, 0.25, 0.5], "max_lambda": 0.5},
        max_eval_samples=50,
    )
    response = bounded_client.post(JOBS, json=body, headers=registered.caller.headers)
    assert response.status_code == 202, response.text


def test_how_far_the_grid_may_extend_is_bounded_too(bounded_client, registered):
    """A choice at the grid's upper end extends the grid up to search.max_lambda (default 8):
    that, too, must fit the operator's NEGMERGE_MAX_LAMBDA."""
    body = job_body(
        registered,
        variants={"base": {"epochs": 1}},
        search={"grid": [0, 0.25, 0.5]},
        max_eval_samples=50,
    )
    response = bounded_client.post(JOBS, json=body, headers=registered.caller.headers)
    refused(response, "search.max_lambda", "8 is more than the limit of 0.5")


def test_the_grid_with_its_extensions_is_bounded(client, registered, db):
    """700 lambdas fit the limit of 1000, but a choice at the upper end extends the grid twice
    (search.max_extensions) to 1398, and refinement adds 4 (search.refine): refused at
    submission, not found out by a worker."""
    grid = [round(i / 699, 10) for i in range(700)]
    body = job_body(registered, search={"grid": grid})
    response = client.post(JOBS, json=body, headers=registered.caller.headers)
    refused(
        response, "search.max_extensions", "1402 points with the grid's extensions and refinement"
    )
    assert jobs_in(db, registered) == 0


def test_the_refinement_points_count_too(client, registered, db):
    """998 lambdas that cannot extend (max_extensions 0) fit the limit of 1000; refinement's
    4 more points do not, and 2 do."""
    grid = [round(i / 997, 10) for i in range(998)]
    search = {"grid": grid, "max_extensions": 0}
    body = job_body(registered, search=search)
    response = client.post(JOBS, json=body, headers=registered.caller.headers)
    refused(response, "search.refine", "1002 points with the grid's extensions and refinement")
    assert jobs_in(db, registered) == 0
    body = job_body(registered, search={**search, "refine": 2})
    response = client.post(JOBS, json=body, headers=registered.caller.headers)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        (  # 2 variants a round, 2 rounds: 4 > 3
            {"variants": {"base": {"epochs": 1}, "grid": {"seed": [1, 2]}},
             "escalation": {"rounds": 1}},
            ("4 variants in all rounds is more than the limit of 3 ", "NEGMERGE_MAX_VARIANTS"),
        ),
        (  # `longer` doubles the epochs: round 1 trains 2 > 1
            {"variants": {"base": {"epochs": 1}},
             "escalation": {"rounds": 1, "strategy": "longer"}},
            ("2 epochs in round 1 is more than the limit of 1", "NEGMERGE_MAX_EPOCHS"),
        ),
    ],
)  # fmt: skip
def test_escalation_rounds_count_in_full(bounded_client, registered, db, changes, words):
    body = job_body(registered, search={"grid": [0, 0.5], "max_lambda": 0.5},
                    max_eval_samples=50, **changes)  # fmt: skip
    response = bounded_client.post(JOBS, json=body, headers=registered.caller.headers)
    refused(response, "escalation.rounds", *words)


def test_escalated_total_steps_are_bounded(client, registered, db):
    # 4 variants of 100,000 steps: within bounds alone; with three more rounds 1.6M steps.
    variants = {"base": {"steps": 100_000}, "grid": {"weight_decay": [0.0, 0.1, 0.2, 0.3]}}
    body = job_body(registered, variants=variants, escalation={"rounds": 3})
    response = client.post(JOBS, json=body, headers=registered.caller.headers)
    refused(response, "escalation.rounds", "16 variants in all rounds of 1600000", "or rounds")
    assert jobs_in(db, registered) == 0
    body["escalation"] = {"rounds": 0}
    assert client.post(JOBS, json=body, headers=registered.caller.headers).status_code == 202
