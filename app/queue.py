"""Sending job steps to the workers. A message carries only (job_id, step): the database row
is the truth about a job, so a lost or repeated message costs nothing but a retry (workers
claim each step in the database, app.services.steps, and the watchdog sends again the steps
whose message was lost).

Only this module knows the broker; the worker side (worker/) registers the task by name.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from celery import Celery

from app.settings import Settings
from app.step_table import FIRST_STEP, Queue, parse_step

log = logging.getLogger(__name__)

RUN_STEP_TASK = "negmerge.run_step"


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """The broker's transport options, the same in the API, the workers and the watchdog.

    visibility_timeout (Redis): a message a worker took but has not acknowledged is delivered
    again after this time. Messages are acknowledged when their step ends (acks_late), so it
    must be longer than the longest step, or Redis would hand a running step to a second
    worker (harmless, the step's lease turns it away, but wasteful).
    """
    if settings.broker_url.startswith("filesystem://"):
        folder = Path(settings.broker_folder)
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # The folder is polled; once a second (the default) adds up over a job's steps.
            "polling_interval": 0.2,
        }
    return {"visibility_timeout": settings.visibility_timeout_seconds}


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for the broker in `settings` (shared with the workers)."""
    celery = Celery("negmerge", broker=settings.broker_url, set_as_current=False)
    celery.conf.update(
        broker_transport_options=broker_transport_options(settings),
        task_default_queue=settings.queue_name,
        broker_connection_timeout=3,
    )
    return celery


class JobQueue:
    """Sends "run step S of job J" messages."""

    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)
        self.queue_name = settings.queue_name
        self.gpu_queue_name = settings.gpu_queue_name

    def queue_for(self, step: str) -> str:
        """The step's kind's queue (app.step_table); the default one for a name of no step."""
        parsed = parse_step(step)
        on_gpu = parsed is not None and parsed.kind.queue is Queue.GPU
        return self.gpu_queue_name if on_gpu else self.queue_name

    def send_step(self, job_id: uuid.UUID, step: str = FIRST_STEP) -> None:
        self.celery.send_task(
            RUN_STEP_TASK,
            args=[str(job_id), step],
            queue=self.queue_for(step),
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
        log.info("sent step", extra={"job_id": str(job_id), "step": step})

    def send_steps(self, job_id: uuid.UUID, steps: list[str]) -> None:
        """Send several steps; one that fails to send is left to the watchdog (logged)."""
        for step in steps:
            try:
                self.send_step(job_id, step)
            except Exception:
                log.exception("could not send step %s of job %s", step, job_id)

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    def close(self) -> None:
        self.celery.close()
