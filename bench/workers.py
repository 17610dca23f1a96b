"""One unlearning job with 1 and with 2 worker processes (one thread each), side by side.

    .venv/bin/python bench/workers.py [--variants 8]

Runs on the embedded default (SQLite, Celery's filesystem transport) in a temporary folder,
with the tiny digits classifier: the API in this process, `celery worker --concurrency 1`
subprocesses, and the watchdog as a thread. The time is from submitting the job to SUCCEEDED.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(workers: int, variants: int, epochs: int, folder: Path) -> float:
    from alembic import command
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from negmerge.fixtures import default_cache_dir, ensure_tiny_classifier
    from tests.app.conftest import alembic_config
    from tests.worker.conftest import register_tenant, settings_env, submit, wait_for
    from worker.watchdog import start_thread

    classifier = ensure_tiny_classifier()
    settings = Settings(
        database_url=f"sqlite:///{folder / 'negmerge.db'}",
        broker_folder=str(folder / "broker"),
        artifact_root=str(folder / "artifacts"),
        data_roots=[str(default_cache_dir())],
        step_lease_seconds=30,
    )
    command.upgrade(alembic_config(settings.database_url), "head")
    env = settings_env(settings)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--concurrency",
                "1",
                "--loglevel",
                "WARNING",
                "--hostname",
                f"bench{i}@%h",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for i in range(workers)
    ]
    _, stop = start_thread(settings)
    app = create_app(settings)
    try:
        time.sleep(8)  # the workers start
        with TestClient(app) as client:
            tenant = register_tenant(client, app.state.db, classifier)
            body = {
                "model": {"id": tenant.model_id, "version": 1},
                "forget": {"dataset_id": tenant.dataset_id, "classes": ["three"]},
                "variants": {
                    "base": {"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": epochs},
                    "grid": {"weight_decay": [1e-4 * (k + 1) for k in range(variants)]},
                },
                "max_eval_samples": 64,
            }
            began = time.perf_counter()
            job = wait_for(client, tenant, submit(client, tenant, body), timeout=1200)
            seconds = time.perf_counter() - began
            assert job["state"] == "SUCCEEDED", job
            return seconds
    finally:
        stop.set()
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait()
        app.state.db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8, help="Of each variant.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    times = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            times[workers] = run(workers, args.variants, args.epochs, Path(folder))
    print(
        f"one job, {args.variants} variants x {args.epochs} epochs, tiny digits classifier, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'workers':>8} {'seconds':>9} {'speed-up':>9}")
    for workers, seconds in times.items():
        print(f"{workers:>8} {seconds:>9.1f} {times[1] / seconds:>8.2f}x")
    print(json.dumps({"seconds": times}))


if __name__ == "__main__":
    main()
