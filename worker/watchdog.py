"""The watchdog: repairs what a lost worker or a lost message leaves behind.

Each pass, in short transactions of their own:
- a RUNNING step whose lease has expired (its worker was killed, or lost the database) goes
  back to PENDING and is sent again; after `step_max_attempts` starts the job is FAILED with
  {code: step_attempts_exhausted, message};
- a step waiting with a message sent more than `resend_after_seconds` ago is sent again (the
  broker may have lost it: Redis restarted without persistence), and so is the first step of
  a QUEUED job no worker has claimed (the API's send failed after its commit);
- a CANCELLING job with no step under a live lease is CANCELLED.
- ended jobs' data is deleted by their retention policy (worker.retention), when the worker
  that ended them did not, or while it waited for another job to end;
- due webhook deliveries are sent (worker.webhooks), up to webhook_batch_size a pass.
- models whose deletion policy (count or window) says a batch is due get its job
  (app.services.deletion_requests.batch_if_due, under the model's row lock).

It runs as its own small process (`python -m worker.watchdog`, one per deployment is enough)
or as a thread of `negmerge serve`. It is not a Celery beat task on purpose: with prefetch 1
and one process per GPU, a periodic task would wait in the queue behind hours-long steps,
exactly when it is needed. Several watchdogs at once are harmless: every repair is a
compare-and-set under the job's row lock, and a message sent twice is turned away by the
step's lease.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections import Counter
from datetime import timedelta

from app.artifacts import store_for
from app.db.base import utcnow
from app.db.deletion_repositories import automatic_policies_with_pending
from app.db.repositories import StepRepository
from app.db.session import Database
from app.queue import JobQueue
from app.services import deletion_requests, steps
from app.settings import Settings, get_settings
from worker.retention import apply_due
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)


def run_once(db: Database, queue: JobQueue, settings: Settings) -> Counter:
    """One pass; returns how many repairs of each kind it made."""
    done: Counter = Counter()
    now = utcnow()
    with db.unit_of_work() as session:
        repo = StepRepository(session)
        expired = repo.expired_leases(now)
        cutoff = now - timedelta(seconds=settings.resend_after_seconds)
        waiting = repo.unsent_steps(cutoff)
        unclaimed = repo.queued_without_steps(cutoff)
        cancelling = repo.cancelling_without_runner(now)
        due_batches = automatic_policies_with_pending(session)
    for job_id, name in expired:
        with db.unit_of_work() as session:
            outcome = steps.requeue_expired(session, job_id, name, settings, queue)
        if outcome:
            done[outcome] += 1
            log.warning("watchdog: step %s of job %s: lease expired, %s", name, job_id, outcome)
    for job_id, name in waiting:
        with db.unit_of_work() as session:
            if steps.resend_pending(session, job_id, name, settings, queue):
                done["resent"] += 1
    for job_id in unclaimed:
        with db.unit_of_work() as session:
            if steps.resend_first_step(session, job_id, settings, queue):
                done["resent_first"] += 1
    for job_id in cancelling:
        with db.unit_of_work() as session:
            if steps.cancel_orphaned(session, job_id, utcnow()):
                done["cancelled"] += 1
    for tenant_id, model_id in due_batches:
        with db.unit_of_work() as session:
            if deletion_requests.batch_if_due(session, tenant_id, model_id, settings, queue, now):
                done["batched"] += 1
    # Ended jobs' data, deleted by their retention policy (pending or waiting ones).
    done.update(apply_due(db, store_for(settings), settings))
    # Last: a slow receiver can delay the end of a pass, never its repairs.
    done.update(deliver_due(db, settings))
    return done


def run_forever(
    db: Database, queue: JobQueue, settings: Settings, stop: threading.Event | None = None
) -> None:
    """A pass every watchdog_interval_seconds until `stop` is set; errors (the database is
    restarting) are logged and the next pass tries again."""
    stop = stop or threading.Event()
    while True:
        try:
            repairs = run_once(db, queue, settings)
            if repairs:
                log.info("watchdog: %s", dict(repairs))
        except Exception:
            log.warning("watchdog pass failed; retrying", exc_info=True)
        if stop.wait(settings.watchdog_interval_seconds):
            return


def start_thread(settings: Settings) -> tuple[threading.Thread, threading.Event]:
    """Run the watchdog in a daemon thread of this process (negmerge serve, tests)."""
    stop = threading.Event()
    db, queue = Database(settings.database_url, pool_size=1), JobQueue(settings)

    def run() -> None:
        try:
            run_forever(db, queue, settings, stop)
        finally:
            queue.close()
            db.dispose()

    thread = threading.Thread(target=run, name="watchdog", daemon=True)
    thread.start()
    return thread, stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.watchdog", description=__doc__)
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(message)s")
    db, queue = Database(settings.database_url, pool_size=1), JobQueue(settings)
    try:
        if args.once:
            print(dict(run_once(db, queue, settings)))
        else:
            run_forever(db, queue, settings)
    finally:
        queue.close()
        db.dispose()


if __name__ == "__main__":
    main()
