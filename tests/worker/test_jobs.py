"""Jobs through the API, Redis and real worker processes, on PostgreSQL.

The tests of this module share one worker process; the last one kills it (SIGKILL,
mid-variant) and finishes the job on a second worker, through the watchdog.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from app.db.models import StepState
from app.queue import JobQueue
from negmerge.merge.streaming import merge_files
from negmerge.task_vector import load_task_vector
from tests.worker.conftest import (
    job_body,
    job_steps,
    queues_drained,
    submit,
    wait_for,
)

ALL_STEPS = ["prepare", "finetune:0", "finetune:1", "merge", "search", "finalize"]


@pytest.fixture(scope="module")
def worker(start_worker, watchdog):  # type: ignore[no-untyped-def]
    process = start_worker("main")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def queue(settings):  # type: ignore[no-untyped-def]
    job_queue = JobQueue(settings)
    yield job_queue
    job_queue.close()


@pytest.fixture(scope="module")
def reference(client, tenant, worker, queue):  # type: ignore[no-untyped-def]
    """One uninterrupted job; its first step is delivered three times and a merge is sent
    before any variant is done."""
    job_id = submit(client, tenant, job_body(tenant))
    queue.send_step(job_id, "prepare")
    queue.send_step(job_id, "prepare")
    queue.send_step(job_id, "merge")
    seen: list[dict] = []
    job = wait_for(client, tenant, job_id, seen=seen)
    return job_id, job, seen


def test_a_job_runs_end_to_end_and_its_model_downloads_with_the_reported_hash(
    client, tenant, reference, settings
):
    job_id, job, seen = reference
    assert job["state"] == "SUCCEEDED", job
    assert job["progress"]["variants_done"] == job["progress"]["variants_total"] == 2
    assert job["progress"]["percent"] == 100.0
    # Live progress: GET showed the stages as they went.
    stages = [j["stage"] for j in seen]
    assert "finetuning" in stages
    assert stages[-1] is None and job["stage"] is None  # finished: no current stage

    report = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=tenant.headers).json()
    assert report["final"] and report["state"] == "SUCCEEDED"
    unlearned = report["unlearned_model"]
    assert unlearned["version"] == 2 and report["lambda"] == job["result"]["lambda"]
    assert report["lambda_curve"] and report["metrics"]["before"] and report["metrics"]["after"]
    assert report["seeds"]["variants"] and report["code_version"]
    # the stored merged vector's size, and what it would take dense, reach the job's result
    assert job["result"]["merged_bytes"] > 0 and job["result"]["merged_dense_bytes"] > 0

    weights = client.get(f"/v1/models/{tenant.model_id}/versions/2/weights", headers=tenant.headers)
    assert weights.status_code == 200
    assert hashlib.sha256(weights.content).hexdigest() == unlearned["weights_sha256"]
    versions = client.get(f"/v1/models/{tenant.model_id}/versions", headers=tenant.headers)
    assert [v["parent_version"] for v in versions.json()["items"]] == [None, 1]
    # The base's sha256 is its version's weights', in the job resource and the report alike
    # (the worker's re-serialised working copy is base_copy_sha256).
    base = client.get(f"/v1/models/{tenant.model_id}/versions/1/weights", headers=tenant.headers)
    base_sha256 = hashlib.sha256(base.content).hexdigest()
    assert job["result"]["base_model_sha256"] == base_sha256
    assert report["base_model"]["weights_sha256"] == report["hashes"]["base_model_sha256"]
    assert report["hashes"]["base_model_sha256"] == base_sha256
    assert report["hashes"]["merged_sha256"] == job["result"]["merged_sha256"]

    # Task vectors are deleted once merged (the job did not ask to keep them); with running
    # merge storage (the default) they were never kept: each variant was folded into the
    # worker's merge state, and the states are gone with the job.
    workdir = Path(settings.artifact_root) / "jobs" / job_id
    assert (workdir / "merged.safetensors").exists()
    assert not list(workdir.glob("variants/*.safetensors"))
    assert not (workdir / "states").exists()


def test_a_step_delivered_twice_has_no_second_effect(
    client, tenant, reference, db, queue, redis_client, settings
):
    job_id, _, _ = reference
    steps = job_steps(db, job_id)
    assert sorted(steps) == sorted(ALL_STEPS)
    assert all(s.state is StepState.DONE and s.attempts == 1 for s in steps.values())
    events = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=tenant.headers).json()

    for step in ("prepare", "finetune:1", "finalize"):  # once more, after the job ended
        queue.send_step(job_id, step)
    queues_drained(redis_client, settings)

    again = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=tenant.headers).json()
    assert again["timeline"] == events["timeline"]
    versions = client.get(f"/v1/models/{tenant.model_id}/versions", headers=tenant.headers)
    assert len(versions.json()["items"]) == 2
    assert all(s.attempts == 1 for s in job_steps(db, job_id).values())


def test_cancel_during_fine_tuning_ends_cancelled_within_seconds(client, tenant, worker, settings):
    slow = {
        "base": {"optimizer": "sgd", "lr": 0.01, "batch_size": 4, "epochs": 40},
        "grid": {"weight_decay": [1e-4, 1e-3]},
    }
    job_id = submit(client, tenant, job_body(tenant, variants=slow))
    wait_for(
        client,
        tenant,
        job_id,
        until=lambda j: (
            j["stage"] == "finetuning"
            and j["progress"].get("current_loss") is not None
            and j["progress"].get("images_per_second", 0) > 0  # the worker's training rate
        ),
        timeout=120,
    )
    asked = time.monotonic()
    response = client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=tenant.headers)
    assert response.status_code == 200 and response.json()["state"] == "CANCELLING"
    job = wait_for(client, tenant, job_id, timeout=30)
    assert job["state"] == "CANCELLED"
    assert time.monotonic() - asked < 10
    workdir = Path(settings.artifact_root) / "jobs" / job_id
    assert not [p for p in workdir.rglob("*") if p.name.endswith(".tmp")]
    assert not list(workdir.glob("variants/*.safetensors"))  # the variant never finished
    versions = client.get(f"/v1/models/{tenant.model_id}/versions", headers=tenant.headers)
    assert len(versions.json()["items"]) == 2  # no new model


def test_a_worker_killed_mid_variant_the_job_completes_with_the_same_model(
    client, tenant, reference, db, worker, start_worker, settings, tmp_path
):
    _, expected, _ = reference
    job_id = submit(client, tenant, job_body(tenant, keep_task_vectors=True))
    # Kill the worker (and its child) the moment it holds a fine-tuning step.
    deadline = time.monotonic() + 120
    victim = None
    while victim is None:
        running = [
            name
            for name, s in job_steps(db, job_id).items()
            if name.startswith("finetune:") and s.state is StepState.RUNNING
        ]
        if running:
            worker.kill()
            victim = running[0]
        assert time.monotonic() < deadline, "no variant started"
        time.sleep(0.05)

    second = start_worker("second")
    try:
        job = wait_for(client, tenant, job_id, timeout=150)
    finally:
        second.stop()
    assert job["state"] == "SUCCEEDED", job
    steps = job_steps(db, job_id)
    assert steps[victim].attempts == 2  # started again after its lease expired
    assert all(s.attempts == 1 for name, s in steps.items() if name != victim)
    # Same seed, same bytes: every task vector and the final model equal the reference's.
    assert job["result"]["task_vector_sha256"] == expected["result"]["task_vector_sha256"]
    assert job["result"]["model"]["weights_sha256"] == expected["result"]["model"]["weights_sha256"]

    # Running merge storage: each variant folded once, into the state of the worker that
    # finished it (the killed one folded nothing); the merge of those states equals the
    # merge of the stored task vectors (kept here, as the job asked).
    folded = [steps[f"finetune:{k}"].output["merge_state"] for k in (0, 1)]
    last = max(folded, key=lambda state: len(state["variants"]))
    assert sorted(last["variants"]) == [0, 1] and len({s["worker"] for s in folded}) == 1
    workdir = Path(settings.artifact_root) / "jobs" / job_id
    taus = sorted(str(p) for p in workdir.glob("variants/*.safetensors"))
    merge_files("negmerge", taus, tmp_path / "baseline.safetensors")
    running = load_task_vector(workdir / "merged.safetensors")
    baseline = load_task_vector(tmp_path / "baseline.safetensors")
    assert running.keys() == baseline.keys()
    for key, value in running.items():
        assert torch.allclose(value, baseline[key], rtol=1e-6, atol=1e-8), key
    assert not (workdir / "states").exists()
