"""Workers against the real PostgreSQL and Redis, with real `celery worker` processes.

Each test session gets its own database (migrated with alembic) and its own queue names, so
it shares Redis with nothing. Jobs run on the tiny digits classifier (negmerge.fixtures),
through the REST API. If PostgreSQL or Redis is down the tests skip, except under CI=true.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from app.db.models import JobStep
from app.db.session import Database
from app.main import create_app
from app.services.tenants import create_key, create_tenant
from app.settings import Settings
from negmerge.fixtures import default_cache_dir, ensure_tiny_classifier
from negmerge.fixtures.tiny_classifier import TinyClassifierFixture
from tests.conftest import REDIS_URL

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
# Two of the quick start's variants: a recipe that forgets (lambda > 0, a new version).
TWO_VARIANTS = {"preset": "tiny-classifier", "grid": {"augment": ["rand-m9-n2", "rand-m9-n3"]}}


@pytest.fixture(scope="session")
def classifier() -> TinyClassifierFixture:
    return ensure_tiny_classifier()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEGMERGE_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if name == "data_roots":
            env["NEGMERGE_DATA_ROOTS"] = json.dumps(value)
        elif isinstance(value, SecretStr):
            env[f"NEGMERGE_{name.upper()}"] = value.get_secret_value()
        else:
            env[f"NEGMERGE_{name.upper()}"] = str(value)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: one thread per worker process
    return env


@pytest.fixture(scope="session")
def settings(
    postgres_url: str, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("workers")
    queue = f"negmerge-wtest-{secrets.token_hex(4)}"
    settings = Settings(
        database_url=postgres_url,
        broker_url=REDIS_URL,
        queue_name=queue,
        gpu_queue_name=f"{queue}-gpu",
        artifact_root=str(root / "artifacts"),
        broker_folder=str(root / "broker"),
        data_roots=[str(default_cache_dir())],
        step_lease_seconds=8.0,  # the second worker takes ~10 s to start anyway
        resend_after_seconds=60.0,
        watchdog_interval_seconds=0.5,
        progress_interval_seconds=0.2,
        db_pool_size=4,
        report_signing_key_file=str(root / "report-signing-key.pem"),
        # The service's retention deletes a job's work files and blocks the version it
        # unlearned from; these tests look into work directories and start every job from
        # version 1. test_retention.py gives its tenant the default policy back.
        retention_intermediates="keep",
        retention_superseded="keep",
    )
    yield settings
    for name in (settings.queue_name, settings.gpu_queue_name):
        redis_client.delete(name, f"_kombu.binding.{name}")
    # Messages a killed worker held stay in kombu's "unacked" hash; drop ours.
    for tag, raw in redis_client.hgetall("unacked").items():
        if settings.queue_name.encode() in raw:
            redis_client.hdel("unacked", tag)
            redis_client.zrem("unacked_index", tag)


class WorkerProcess:
    """`celery -A worker.celery_app worker` as a subprocess in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                "1",
                "--hostname",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"worker did not start:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the worker and its children at once: no shutdown, no message requeued."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def start_worker(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], WorkerProcess]]:
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(name: str) -> WorkerProcess:
        worker = WorkerProcess(settings_env(settings), logs / f"{name}.log", name)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.stop()


@pytest.fixture(scope="session")
def app(settings: Settings):  # type: ignore[no-untyped-def]
    application = create_app(settings)
    yield application
    application.state.db.dispose()


@pytest.fixture(scope="session")
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def db(app) -> Database:  # type: ignore[no-untyped-def]
    return app.state.db


@pytest.fixture(scope="module")
def watchdog(settings: Settings) -> Iterator[None]:
    """The watchdog as a thread of the test process, for one test module."""
    from worker.watchdog import start_thread

    thread, stop = start_thread(settings)
    yield
    stop.set()
    thread.join(timeout=10)


@dataclass(frozen=True)
class Tenant:
    headers: dict[str, str]
    model_id: str
    dataset_id: str


def register_tenant(client: TestClient, db: Database, classifier: TinyClassifierFixture) -> Tenant:
    """A tenant with an admin key, the tiny classifier as a model and digits as a data set."""
    with db.unit_of_work() as session:
        tenant = create_tenant(session, f"t-{secrets.token_hex(3)}", "test")
        _, key = create_key(session, tenant, ["admin"], "test", "test")
    headers = {"Authorization": f"Bearer {key}"}
    model = client.post(
        "/v1/models",
        json={
            "name": "digits-net",
            "family": "classifier",
            "architecture": classifier.model_name,
            "classes": list(classifier.classes),
            "weights_uri": str(classifier.weights_path),
            "image_size": classifier.input_size[-1],
        },
        headers=headers,
    )
    assert model.status_code == 201, model.text
    dataset = client.post(
        "/v1/datasets",
        json={"name": "digits", "manifest_uri": str(classifier.dataset_root / "manifest.jsonl")},
        headers=headers,
    )
    assert dataset.status_code == 201, dataset.text
    return Tenant(headers, model.json()["id"], dataset.json()["id"])


@pytest.fixture(scope="session")
def tenant(client: TestClient, db: Database, classifier: TinyClassifierFixture) -> Tenant:
    return register_tenant(client, db, classifier)


def job_body(tenant: Tenant, **changes: object) -> dict:
    """Forget the digit "three", on version 1 of the model, with two tiny variants (each step
    costs a fresh worker child process: a few seconds)."""
    body: dict = {
        "model": {"id": tenant.model_id, "version": 1},
        "forget": {"dataset_id": tenant.dataset_id, "classes": ["three"]},
        "variants": TWO_VARIANTS,
        "max_eval_samples": 64,
        "subject_reference": "DSR-7",
        # Tests run one forget set many times; refusing repeats is tested in tests/app.
        "allow_repeat": True,
    }
    body.update(changes)
    return body


def submit(client: TestClient, tenant: Tenant, body: dict) -> str:
    response = client.post("/v1/unlearning-jobs", json=body, headers=tenant.headers)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for(
    client: TestClient,
    tenant: Tenant,
    job_id: str,
    until: Callable[[dict], bool] = lambda job: job["state"] in TERMINAL,
    timeout: float = 150,
    seen: list[dict] | None = None,
) -> dict:
    """Poll GET until `until(job)`; every answer is appended to `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/unlearning-jobs/{job_id}", headers=tenant.headers).json()
        if seen is not None:
            seen.append(job)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} timed out: {job}")
        time.sleep(0.1)


def job_steps(db: Database, job_id: str) -> dict[str, JobStep]:
    with db.unit_of_work() as session:
        rows = session.scalars(select(JobStep).where(JobStep.job_id == uuid.UUID(job_id)))
        return {row.name: row for row in rows}


def queues_drained(redis_client: redis.Redis, settings: Settings, timeout: float = 60) -> None:
    """Wait until no message of ours is queued or held by a worker."""
    ours = (settings.queue_name.encode(), settings.gpu_queue_name.encode())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = sum(redis_client.llen(name) for name in ours)
        held = [raw for raw in redis_client.hvals("unacked") if any(q in raw for q in ours)]
        if not queued and not held:
            return
        time.sleep(0.2)
    raise AssertionError("the workers did not drain the queues")
