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

No CUDA before fork: nothing here or in worker.tasks touches torch.cuda at import time; the
first CUDA call happens in the child process that runs a step.
"""

from __future__ import annotations

from celery import bootsteps
from kombu import Queue

from app.queue import make_celery
from app.settings import Settings, get_settings


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
