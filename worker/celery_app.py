"""The Celery app of the workers: `celery -A worker.celery_app worker`.

Built from the same settings as the API (app.queue.make_celery), so the broker URL and its
transport options (the visibility timeout) are the same everywhere. Configured for long GPU
steps (README, "Workers"):

- task_acks_late: a message is acknowledged when its step ends, not when it starts, so a
  worker that dies mid-step leaves it to be delivered again.
- worker_prefetch_multiplier = 1: a worker holds no message it is not running, so a free
  worker can take the next variant while another trains.
- visibility timeout (broker_transport_options, NEGMERGE_VISIBILITY_TIMEOUT_SECONDS): longer
  than the longest step, or Redis would hand a running step to a second worker.
- task_reject_on_worker_lost: a child killed mid-step (OOM killer) puts its message back.
- worker_max_tasks_per_child = 1: a fresh child process per step, which frees all the GPU
  memory the step used.
- worker_cancel_long_running_tasks_on_connection_loss: a worker cut off from the broker stops
  its running step (its message will be delivered again), rather than finish work whose
  acknowledgement cannot be sent.
- queues: the default queue for CPU steps and `gpu` (NEGMERGE_GPU_QUEUE_NAME) for
  fine-tuning; a worker takes both unless started with -Q.

Least privilege: the parent drops the database and broker URLs from its environment once the
settings are read, before the pool forks (worker.credentials), so no step's environment, nor
any process a step starts, has them.

No CUDA before fork: nothing here or in worker.tasks touches torch.cuda at import time; the
first CUDA call happens in the child process that runs a step.

Cheap fresh children: the parent imports what a step needs (timm, open_clip, the database
driver: about 1.5 s) before it forks, so each step's new child starts with them loaded; and
each child gives torch its share of the cores (cores / concurrency, unless OMP_NUM_THREADS is
set), so that a worker's processes do not oversubscribe them.

Loader processes: a fine-tuning step loads its batches on processes of its own
(NEGMERGE_FINETUNE_LOADER_WORKERS, negmerge.loading), forked from the step's child after it
started; Python refuses children to a daemonic process, as the pool's are, so each child is
marked non-daemonic. The pool does not rely on the mark (it ends its children itself), and
the loader processes exit when their parent does (they watch it).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os

from celery import bootsteps, signals
from kombu import Queue
from sqlalchemy import create_engine

from app.queue import make_celery
from app.settings import Settings, get_settings
from worker.credentials import forget_credentials

# Imported by the parent before the pool forks. None of them initialises CUDA (tested).
STEP_MODULES = (
    "timm",
    "open_clip",
    "negmerge.finetune",
    "negmerge.models.classifier",
    "negmerge.models.open_clip",
)

_controller = None  # the WorkController of this worker (set in the parent, inherited by children)


def preload_step_modules(settings: Settings) -> None:
    """Import what a step needs, in the worker's parent (no CUDA, no torch work: a parent that
    has run OpenMP threads can deadlock its forked children)."""
    for name in STEP_MODULES:
        importlib.import_module(name)
    # The database driver (psycopg): an engine imports it without connecting.
    create_engine(settings.database_url).dispose()


def torch_threads(concurrency: int, setting: int | str = "auto") -> int | None:
    """CPU threads for torch in one worker child: NEGMERGE_WORKER_TORCH_THREADS, or (auto)
    the cores divided among the worker's processes (one each when they match), or None
    where OMP_NUM_THREADS is set: an explicit choice torch already follows (set it to 1
    when several workers share the cores)."""
    if setting != "auto":
        return int(setting)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, concurrency))


@signals.worker_init.connect
def _on_worker_init(sender=None, **_: object) -> None:  # type: ignore[no-untyped-def]
    global _controller
    _controller = sender
    preload_step_modules(get_settings())  # the settings are read, and kept, from here on
    forget_credentials()  # before the pool forks: no step's environment has them


def allow_loader_processes() -> None:
    """Let this pool child start processes of its own (see the module's docstring)."""
    multiprocessing.current_process()._config["daemon"] = False  # billiard's Process


@signals.worker_process_init.connect
def _on_worker_process_init(**_: object) -> None:
    import torch

    allow_loader_processes()
    concurrency = getattr(_controller, "concurrency", None)
    threads = torch_threads(
        concurrency if isinstance(concurrency, int) else 1, get_settings().worker_torch_threads
    )
    if threads is not None:
        torch.set_num_threads(threads)


class PromptChildReplacement(bootsteps.StartStopStep):
    """Replace an exited child process within a quarter second, not five.

    With one task per child, the pool replaces its child after every step. It notices the
    exit from the child's sentinel pipe, but that closes an instant before the child can be
    reaped, so the replacement usually waits for the pool's 5-second maintenance timer: five
    idle seconds per step. Checking the pool more often removes them.
    """

    requires = ("celery.worker.components:Pool", "celery.worker.components:Hub")
    interval = 0.25

    def start(self, worker) -> None:  # type: ignore[no-untyped-def]
        hub = getattr(worker, "hub", None)
        pool = getattr(getattr(worker, "pool", None), "_pool", None)
        if hub is not None and hasattr(pool, "maintain_pool"):
            hub.call_repeatedly(self.interval, pool.maintain_pool)


def create_celery(settings: Settings):  # type: ignore[no-untyped-def]
    """The workers' Celery app for `settings`."""
    celery = make_celery(settings)
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_concurrency=settings.variants_per_device(),  # --concurrency overrides it
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        task_ignore_result=True,
        task_queues=[Queue(settings.queue_name), Queue(settings.gpu_queue_name)],
        task_default_queue=settings.queue_name,
        broker_connection_retry_on_startup=True,
        imports=["worker.tasks"],
    )
    celery.steps["worker"].add(PromptChildReplacement)
    return celery


app = create_celery(get_settings())
