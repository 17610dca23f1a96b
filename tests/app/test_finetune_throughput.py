"""The training rate a worker reports: in the job's progress and on /metrics."""

from __future__ import annotations

import uuid

from app.services import steps
from tests.app.jobs_driver import OWNER, submit


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


def test_a_fine_tuning_jobs_images_per_second_show_in_its_progress_and_metrics(
    app, client, registered
):
    job_id = submit(client, registered)
    db, settings, queue = app.state.db, app.state.settings, app.state.queue
    job = uuid.UUID(job_id)
    assert metric(client.get("/metrics").text, "negmerge_finetune_images_per_second") == 0
    with db.unit_of_work() as session:
        claim = steps.claim_step(session, job, steps.PREPARE, OWNER, settings)
        assert claim is not None
        variants = steps.complete_step(session, claim, {"metrics": {}, "seconds": 0.1}, queue)
    with db.unit_of_work() as session:
        assert steps.claim_step(session, job, variants[0], OWNER, settings) is not None
    progress = client.get(f"/v1/unlearning-jobs/{job_id}", headers=registered.caller.headers)
    assert "images_per_second" not in progress.json()["progress"]  # nothing reported yet

    with db.unit_of_work() as session:  # what ProgressWriter.on_step writes
        steps.report_loss(session, job, 0.75, 1234.5)
    progress = client.get(f"/v1/unlearning-jobs/{job_id}", headers=registered.caller.headers)
    assert progress.json()["progress"]["images_per_second"] == 1234.5
    assert progress.json()["progress"]["current_loss"] == 0.75
    assert metric(client.get("/metrics").text, "negmerge_finetune_images_per_second") == 1234.5
