"""Redis restarted mid-job, for real: the job still completes, and no step runs twice.

The test runs its own `redis-server` on a free port (never the shared one on 6379), with no
persistence, so the restart loses every queued and unacknowledged message. The worker, the
API's queue and the watchdog all use it. What brings the job home: the worker reconnects
(broker_connection_retry), the step it was running is cancelled on the connection loss and
sent again once its lease expires, and lost messages of waiting steps are sent again from the
database (resend_after_seconds, low here).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import JobEvent, StepState
from app.main import create_app
from app.settings import Settings
from tests.worker.conftest import (
    WorkerProcess,
    job_body,
    job_steps,
    settings_env,
    submit,
    wait_for,
)

ALL_STEPS = ["prepare", "finetune:0", "finetune:1", "merge", "search", "finalize"]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateRedis:
    """A throwaway redis-server on `port` that keeps nothing on disk."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        # Nothing on disk: a restart loses every message, the worst case for the workers.
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--daemonize", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@pytest.fixture
def restart_settings(settings: Settings, private_redis: PrivateRedis) -> Settings:
    return settings.model_copy(
        update={
            "broker_url": f"redis://127.0.0.1:{private_redis.port}/0",
            "queue_name": f"{settings.queue_name}-r",
            "gpu_queue_name": f"{settings.gpu_queue_name}-r",
            "resend_after_seconds": 4.0,
        }
    )


def test_redis_restarted_mid_job_the_job_completes_and_no_step_runs_twice(
    tenant, db, restart_settings, private_redis, tmp_path
):
    from worker.watchdog import start_thread

    worker = WorkerProcess(settings_env(restart_settings), tmp_path / "worker.log", "restart")
    _, stop_watchdog = start_thread(restart_settings)
    app = create_app(restart_settings)
    try:
        worker.wait_ready()
        with TestClient(app, raise_server_exceptions=False) as client:
            job_id = submit(client, tenant, job_body(tenant, keep_task_vectors=True))
            # Restart Redis the moment a variant is being fine-tuned.
            deadline = time.monotonic() + 60
            while True:
                steps = job_steps(db, job_id)
                running = [
                    name
                    for name, s in steps.items()
                    if name.startswith("finetune:") and s.state is StepState.RUNNING
                ]
                if running:
                    break
                assert time.monotonic() < deadline, f"no variant started: {steps}"
                time.sleep(0.05)
            private_redis.kill()
            time.sleep(1.0)
            private_redis.start()

            job = wait_for(client, tenant, job_id, timeout=60)
            assert job["state"] == "SUCCEEDED", (job, worker.log_path.read_text()[-3000:])
            report = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=tenant.headers)
            unlearned = report.json()["unlearned_model"]
            weights = client.get(
                f"/v1/models/{tenant.model_id}/versions/{unlearned['version']}/weights",
                headers=tenant.headers,
            )
    finally:
        stop_watchdog.set()
        worker.stop()
        app.state.db.dispose()

    steps = job_steps(db, job_id)
    assert sorted(steps) == sorted(ALL_STEPS)
    assert all(s.state is StepState.DONE for s in steps.values())
    # Only a step cut off by the restart may have started twice; the rest ran once.
    assert all(s.attempts == 1 for name, s in steps.items() if name not in running)
    assert all(steps[name].attempts <= 2 for name in running)
    # Each variant's completion was recorded once: its tau was written once.
    with db.unit_of_work() as session:
        details = session.scalars(
            select(JobEvent.details).where(JobEvent.job_id == steps["merge"].job_id)
        ).all()
    assert [d["variants_done"] for d in details if d and "variants_done" in d] == [1, 2]
    workdir = Path(restart_settings.artifact_root) / "jobs" / job_id
    taus = sorted(workdir.glob("variants/*.safetensors"))
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in taus] == job["result"][
        "task_vector_sha256"
    ]
    # The model that downloads is the one the report and the job name.
    assert weights.status_code == 200
    sha256 = hashlib.sha256(weights.content).hexdigest()
    assert sha256 == unlearned["weights_sha256"] == job["result"]["model"]["weights_sha256"]
