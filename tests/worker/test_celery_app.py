"""The workers' Celery configuration for long GPU steps, and no CUDA before fork."""

from __future__ import annotations

import os
import subprocess
import sys

from app.queue import JobQueue
from app.settings import Settings
from worker.celery_app import PromptChildReplacement, create_celery, torch_threads


def test_the_celery_app_is_configured_for_long_gpu_steps():
    settings = Settings(broker_url="redis://127.0.0.1:6379/0", visibility_timeout_seconds=7200)
    celery = create_celery(settings)
    conf = celery.conf
    assert PromptChildReplacement in celery.steps["worker"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert {q.name for q in conf.task_queues} == {"negmerge", "gpu"}
    # The API sends with the same broker options as the workers read.
    assert conf.broker_transport_options == {"visibility_timeout": 7200}
    assert JobQueue(settings).celery.conf.broker_transport_options == {"visibility_timeout": 7200}
    assert settings.visibility_timeout_seconds > settings.step_lease_seconds


def test_fine_tuning_goes_to_the_gpu_queue_and_the_rest_to_the_default():
    queue = JobQueue(Settings(broker_url="redis://127.0.0.1:6379/0"))
    assert queue.queue_for("finetune:3") == "gpu"
    assert {queue.queue_for(s) for s in ("prepare", "merge", "search", "finalize")} == {"negmerge"}


def test_importing_the_workers_does_not_initialise_cuda():
    code = (
        "import worker.celery_app, worker.tasks, worker.watchdog, torch; "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised before fork'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_parent_preloads_the_step_modules_without_initialising_cuda():
    code = (
        "import sys, torch; from app.settings import Settings; "
        "from worker.celery_app import STEP_MODULES, preload_step_modules; "
        "preload_step_modules(Settings(database_url='postgresql+psycopg://u@h/db')); "
        "assert all(m in sys.modules for m in STEP_MODULES + ('psycopg',)); "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised before fork'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_each_worker_process_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert torch_threads(concurrency=2) == 1
    assert torch_threads(concurrency=1) == 2
    assert torch_threads(concurrency=4) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit choice is left to torch
    assert torch_threads(concurrency=2) is None


def _load_in_a_pool_child(allow: bool, results) -> None:  # type: ignore[no-untyped-def]
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from worker.celery_app import allow_loader_processes

    if allow:
        allow_loader_processes()
    try:
        loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2, num_workers=2)
        results.put(sum(float(batch.sum()) for (batch,) in loader))
    except AssertionError as exc:  # "daemonic processes are not allowed to have children"
        results.put(str(exc))


def test_a_pool_child_may_start_the_fine_tunings_loader_processes():
    import billiard  # Celery's pool: its children are daemonic processes

    for allow, expected in ((False, "daemonic processes are not allowed to have children"),
                            (True, 28.0)):  # fmt: skip
        results = billiard.Queue()
        child = billiard.Process(target=_load_in_a_pool_child, args=(allow, results), daemon=True)
        child.start()
        assert results.get(timeout=120) == expected
        child.join(timeout=30)
