"""`negmerge serve`: the whole service on one machine: the API, a worker and the watchdog.

With no configuration it is the embedded default: SQLite at ./var/negmerge.db (migrated on
start), Celery's filesystem transport under ./var/broker, artifacts under ./var/artifacts.
With NEGMERGE_DATABASE_URL and NEGMERGE_BROKER_URL set, the same processes use PostgreSQL
and Redis. Attached to `negmerge` through the `negmerge.commands` entry-point group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from app.settings import Settings, get_settings

log = logging.getLogger(__name__)
ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"


def migrate(settings: Settings) -> None:
    """alembic upgrade head on the configured database."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def worker_command(settings: Settings, concurrency: int, name: str) -> list[str]:
    """The celery worker command line: both queues, `concurrency` processes."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel",
        settings.log_level,
        "--concurrency",
        str(concurrency),
        "--queues",
        f"{settings.queue_name},{settings.gpu_queue_name}",
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--workers",
    default=None,
    type=int,
    help="Worker processes (0: API only; default NEGMERGE_WORKER_VARIANTS_PER_DEVICE's).",
)
@click.option(
    "--migrate/--no-migrate",
    "run_migrations",
    default=None,
    help="Run alembic upgrade head first (default: only for SQLite).",
)
def serve(host: str, port: int, workers: int | None, run_migrations: bool | None) -> None:
    """Run the API, the workers and the watchdog on this machine."""
    import uvicorn

    from app.main import create_app
    from app.observability import configure_logging
    from worker.watchdog import start_thread

    settings = get_settings()
    workers = settings.variants_per_device() if workers is None else workers
    configure_logging(settings.log_level)
    if run_migrations or (run_migrations is None and settings.database_url.startswith("sqlite")):
        migrate(settings)
    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default
    # action would then end this process before the `finally` below stops the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker, stop = None, None
    try:
        if workers > 0:
            worker = subprocess.Popen(
                worker_command(settings, workers, f"serve-{os.getpid()}"), env=os.environ.copy()
            )
        _, stop = start_thread(settings)
        click.echo(
            f"NegMerge Service on http://{host}:{port} (OpenAPI: /docs); "
            f"{workers} worker process(es); Ctrl-C or SIGTERM stops it",
            err=True,
        )
        uvicorn.run(create_app(settings), host=host, port=port, log_config=None)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not skip the rest
        if stop is not None:
            stop.set()
        if worker is not None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: the running step finishes
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
