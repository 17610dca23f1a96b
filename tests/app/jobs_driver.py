"""Finishing a job without workers: tests/app has none, so a job submitted through the API is
driven through every step with the functions the workers call (app.services.steps), its result
shaped as worker/tasks.py run_finalize writes it and its verdict judged by the library's own
code (negmerge.verdict), against the target in the job's spec."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.db.models import ModelVersion, UnlearningJob
from app.schemas.results import StoredVersion
from app.services import steps
from app.services.models import add_version
from app.services.results import job_result
from negmerge.escalation import RoundSummary, RoundVerdict
from negmerge.job_spec import JobSpec
from negmerge.search import Evaluation, search_lambda
from negmerge.stage_outputs import (
    BaseModelHashes,
    BeforeAfter,
    EscalationOutcome,
    ForgetSetHashes,
    GroupBeforeAfter,
    Merged,
    ModelFile,
    Original,
    Report,
    Searched,
    Seeds,
    StageOutput,
    VariantRecord,
    to_stored,
)
from negmerge.verdict import judge
from tests.app.conftest import Registered, job_body

OWNER = "dashboard-test-worker/0"
# The split metrics a worker measures (negmerge.context JobContext.metrics), before and after.
METRICS_BEFORE = {
    "forget_acc": 100.0,
    "forget_test_acc": 50.0,
    "retain_acc": 93.75,
    "test_acc": 88.5,
    "mia": 12.0,
}
METRICS_AFTER = {
    "forget_acc": 25.0,
    "forget_test_acc": 40.0,
    "retain_acc": 90.0,
    "test_acc": 86.25,
    "mia": 71.5,
}


GROUP_BEFORE = {"count": 2, "acc": 100.0, "true_label_confidence": 91.5}
GROUP_AFTER = {"count": 2, "acc": 0.0, "true_label_confidence": 12.25}

SPLIT_SIZES = {"forget": 12, "forget_val": 4, "forget_test": 5, "retain": 80, "retain_val": 16,
               "test": 20, "holdout": 16}  # fmt: skip


def synthetic_evaluation(lam: float) -> Evaluation:
    """A typical curve: forget accuracy falls fast with lambda, retain accuracy slowly."""
    return Evaluation(forget_acc=max(0.0, 100.0 - 160.0 * lam), retain_acc=95.0 - 18.0 * lam)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def submit(client: TestClient, registered: Registered, **changes: object) -> str:
    response = client.post(
        "/v1/unlearning-jobs",
        json=job_body(registered, **changes),
        headers=registered.caller.headers,
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def three_outcomes(app: FastAPI, client: TestClient, registered: Registered) -> tuple[str, ...]:
    """Three SUCCEEDED jobs: one that met its target, one that missed it, and one left
    unchanged (lambda 0, so never met): their ids, in that order."""
    met, missed, unchanged = (submit(client, registered, target=t) for t in
                              (MET_TARGET, MISSED_TARGET, MET_TARGET))  # fmt: skip
    drive_to_success(app, met)
    drive_to_success(app, missed)
    drive_to_success(app, unchanged, grid=[0.0])
    return met, missed, unchanged


def drive_to_success(
    app: FastAPI, job_id: str, grid: list[float] | None = None, rounds: int = 1
) -> dict[str, Any]:
    """Take a QUEUED job through every step as the workers do; returns the result it ends with.
    `grid`: the lambda search's (default 0..1; [0.0] makes the search choose lambda 0).
    `rounds`: the rounds its result lists (as escalation would; only the steps of one run)."""
    db, settings, queue = app.state.db, app.state.settings, app.state.queue
    job = uuid.UUID(job_id)

    def claim(step: str) -> steps.Claim:
        with db.unit_of_work() as session:
            claimed = steps.claim_step(session, job, step, OWNER, settings)
        assert claimed is not None, step
        return claimed

    def complete(step: str, output: StageOutput) -> list[str]:
        held = claim(step)
        with db.unit_of_work() as session:
            return steps.complete_step(session, held, to_stored(output), queue)

    base_sha = sha("base model state")  # the worker's re-serialised working copy
    with db.unit_of_work() as session:  # prepare hashes the base version's weights
        row = session.get(UnlearningJob, job)
        weights_sha = session.get(ModelVersion, row.model_version_id).weights_sha256
    original = Original(
        metrics=METRICS_BEFORE,
        base_sha256=base_sha,
        weights_sha256=weights_sha,
        forget_manifest_sha256=sha("forget manifest"),
        forget_count=SPLIT_SIZES["forget"],
        split_sizes=SPLIT_SIZES,
        seconds=0.5,
    )
    variants = complete(steps.PREPARE, original)
    records = []
    for name in variants:
        index = steps.variant_index(name)
        record = VariantRecord(
            index=index,
            key=f"variant-{index}",
            hyperparameters={},
            tau_sha256=sha(f"tau {index}"),
            seconds=1.0,
        )
        records.append(record)
        complete(name, record)
    merged = Merged(
        method="negmerge",
        n=len(records),
        kept_fraction=0.4321,
        merged_sha256=sha("merged"),
        variants=records,
        seconds=0.2,
    )
    complete(steps.MERGE, merged)

    held = claim(steps.SEARCH)

    def counted(lam: float, _evaluation: Evaluation) -> None:
        with db.unit_of_work() as session:
            steps.lambda_evaluated(session, job, lam)

    result = search_lambda(synthetic_evaluation, strategy="grid", grid=grid, on_evaluation=counted)
    searched = Searched.model_validate({**result.to_dict(), "seconds": 0.3})
    with db.unit_of_work() as session:
        steps.complete_step(session, held, to_stored(searched), queue)

    held = claim(steps.FINALIZE)
    lam = searched.lambda_
    spec = JobSpec.model_validate(held.spec)
    target, default = spec.resolved_target()
    verdict = judge(
        target, spec.target_kind, METRICS_BEFORE, METRICS_AFTER, lam, default_target=default
    )
    unlearned_sha = sha("unlearned model")
    with db.unit_of_work() as session:
        row = steps.held_job(session, held)
        assert row is not None
        model = None
        if lam != 0:  # as run_finalize: lambda 0 makes no version
            version = add_version(
                session,
                row.tenant_id,
                row.model_id,
                weights_uri=f"/nonexistent/{unlearned_sha}.safetensors",
                weights_sha256=unlearned_sha,
                size_bytes=1234,
                parent_version_id=row.model_version_id,
                produced_by_job_id=row.id,
                actor=steps.WORKER,
                finetuning=spec.finetuning,
            )
            model = StoredVersion(
                model_id=row.model_id,
                version=version.version,
                version_id=version.id,
                weights_sha256=unlearned_sha,
            )
        # As the pipeline's finalize reports it (negmerge.pipeline), for the worker's builder.
        summaries = [
            RoundSummary(
                round=r,
                variants_merged=[rec.index for rec in records],
                finetune_seconds=1.0,
                kept_fraction=merged.kept_fraction,
                lambda_=lam,
                verdict=RoundVerdict(met=verdict.met and r == rounds - 1, reason=verdict.reason),
                model_sha256=unlearned_sha if lam else None,
            )
            for r in range(rounds)
        ]
        report = Report(
            code_version="negmerge 0.1.0 (test)",
            job=held.spec,
            seeds=Seeds(job=0, variants=[0] * len(records)),
            base_model=BaseModelHashes(sha256=base_sha, weights_sha256=weights_sha),
            forget_set=ForgetSetHashes(
                manifest_sha256=original.forget_manifest_sha256, count=original.forget_count
            ),
            split_sizes=SPLIT_SIZES,
            variants=records,
            merge=merged.summary(),
            search=searched,
            lambda_=lam,
            metrics=BeforeAfter(before=METRICS_BEFORE, after=METRICS_AFTER),
            # Each group's own samples (a batch's deletion requests), as finalize measures them.
            groups={
                name: GroupBeforeAfter(before=GROUP_BEFORE, after=GROUP_AFTER)
                for name in spec.groups
            },
            verdict=verdict,
            round=rounds - 1,
            rounds=summaries,
            escalation=EscalationOutcome(
                next_round=None, stopped_because="target met" if verdict.met else None
            ),
            model=ModelFile(path="/nonexistent/model.safetensors", sha256=unlearned_sha)
            if lam
            else None,
            finetuning=spec.finetuning,
            timings={"prepare": 0.5, "finetune": 1.0, "merge": 0.2, "search": 0.3},
        )
        result = job_result(report, model)
        summary = {"report_path": "/nonexistent/report.json", "model_sha256": unlearned_sha}
        assert steps.finish_job(session, held, summary, result) is not None
    return result.to_json()  # as the job row stores it and the API shows it


# Targets whose verdict on METRICS_AFTER is certain whatever the recipe: forget accuracy is
# 25 and 40 after, so at most 50 is met and at most 0 is not (retain stays above 0.95x).
MET_TARGET = {"forget_acc_max": 50.0}
MISSED_TARGET = {"forget_acc_max": 0.0}
