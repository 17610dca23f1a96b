"""The training rate and device use a worker reports: in the job's progress and on /metrics."""

from __future__ import annotations

import uuid

from app.db.models import UnlearningJob
from app.services import steps
from tests.app.jobs_driver import OWNER, submit
from worker.tasks import ProgressWriter, Runtime


def metric(text: str, name: str) -> float | None:
    """The sample of an unlabelled gauge; None when the family has none."""
    line = next((line for line in text.splitlines() if line.startswith(f"{name} ")), None)
    return None if line is None else float(line.split()[1])


def fine_tuning(app, client, registered) -> uuid.UUID:
    """A submitted job whose first variant a worker has claimed: the job is fine-tuning."""
    job = uuid.UUID(submit(client, registered))
    db, settings, queue = app.state.db, app.state.settings, app.state.queue
    with db.unit_of_work() as session:
        claim = steps.claim_step(session, job, steps.PREPARE, OWNER, settings)
        assert claim is not None
        variants = steps.complete_step(session, claim, {"metrics": {}, "seconds": 0.1}, queue)
    with db.unit_of_work() as session:
        assert steps.claim_step(session, job, variants[0], OWNER, settings) is not None
    return job


def test_a_fine_tuning_jobs_images_per_second_show_in_its_progress_and_metrics(
    app, client, registered
):
    assert metric(client.get("/metrics").text, "negmerge_finetune_images_per_second") == 0
    job = fine_tuning(app, client, registered)
    job_id, db = str(job), app.state.db
    progress = client.get(f"/v1/unlearning-jobs/{job_id}", headers=registered.caller.headers)
    assert "images_per_second" not in progress.json()["progress"]  # nothing reported yet

    with db.unit_of_work() as session:  # what ProgressWriter.on_step writes
        steps.report_loss(session, job, 0.75, 1234.5)
    progress = client.get(f"/v1/unlearning-jobs/{job_id}", headers=registered.caller.headers)
    assert progress.json()["progress"]["images_per_second"] == 1234.5
    assert progress.json()["progress"]["current_loss"] == 0.75
    assert metric(client.get("/metrics").text, "negmerge_finetune_images_per_second") == 1234.5


def test_the_running_variants_device_memory_and_utilisation_show_on_metrics(
    app, client, registered
):
    text = client.get("/metrics").text
    assert metric(text, "negmerge_finetune_device_jobs") == 0
    assert metric(text, "negmerge_finetune_device_memory_allocated_mib") == 0
    assert metric(text, "negmerge_finetune_device_utilization_percent") is None
    gpu, cpu = fine_tuning(app, client, registered), fine_tuning(app, client, registered)
    # What ProgressWriter.on_step writes: negmerge.finetune.device_usage of the variant's
    # device, None on CPU.
    usage = {"memory_allocated_mib": 2048.0, "memory_peak_mib": 3072.5, "utilization_percent": 87}
    with app.state.db.unit_of_work() as session:
        steps.report_loss(session, gpu, 0.5, 900.0, usage)
    runtime = Runtime(app.state.settings, app.state.db, app.state.queue, pid=0)
    ProgressWriter(runtime, cpu, "cpu").on_step(1, 10, 0.6, 40.0)  # the worker's own path
    with app.state.db.unit_of_work() as session:
        assert session.get(UnlearningJob, cpu).current_images_per_second == 40.0
    text = client.get("/metrics").text
    assert metric(text, "negmerge_finetune_device_jobs") == 1  # the CPU run reports none
    assert metric(text, "negmerge_finetune_device_memory_allocated_mib") == 2048.0
    assert metric(text, "negmerge_finetune_device_memory_peak_mib") == 3072.5
    assert metric(text, "negmerge_finetune_device_utilization_percent") == 87

    # Without NVML the worker reports memory only: no utilisation sample, memory still summed.
    with app.state.db.unit_of_work() as session:
        steps.report_loss(session, cpu, 0.6, 40.0, {"memory_allocated_mib": 100.0})
        steps.report_loss(session, gpu, 0.5, 900.0, {"memory_allocated_mib": 1000.0})
    text = client.get("/metrics").text
    assert metric(text, "negmerge_finetune_device_jobs") == 2
    assert metric(text, "negmerge_finetune_device_memory_allocated_mib") == 1100.0
    assert metric(text, "negmerge_finetune_device_utilization_percent") is None
