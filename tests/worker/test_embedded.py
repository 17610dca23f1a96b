"""The embedded default: `negmerge serve` with SQLite and Celery's filesystem transport, no
server installed; the same job as on PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.db.session import Database
from negmerge.fixtures import default_cache_dir
from tests.worker.conftest import TERMINAL, job_body, register_tenant, submit, wait_for

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def embedded(tmp_path: Path):  # type: ignore[no-untyped-def]
    """`negmerge serve` in a fresh folder with no NEGMERGE_DATABASE_URL or _BROKER_URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEGMERGE_")}
    env.update(
        NEGMERGE_DATA_ROOTS=json.dumps([str(default_cache_dir())]),
        NEGMERGE_STEP_LEASE_SECONDS="8",
        NEGMERGE_WATCHDOG_INTERVAL_SECONDS="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    negmerge = Path(sys.executable).with_name("negmerge")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [str(negmerge), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "negmerge serve did not start"
            time.sleep(0.3)
        yield base, tmp_path, process
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have stopped it already
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_the_embedded_default_runs_a_job_end_to_end(embedded, classifier):
    base, folder, _ = embedded
    assert (folder / "var" / "negmerge.db").exists()  # migrated on start
    db = Database(f"sqlite:///{folder / 'var' / 'negmerge.db'}")
    with httpx.Client(base_url=base, timeout=30) as client:
        tenant = register_tenant(client, db, classifier)
        job_id = submit(client, tenant, job_body(tenant))
        # Until the job's retention has run (the defaults: its intermediates are deleted).
        job = wait_for(client, tenant, job_id, retained, timeout=150)
        assert job["state"] == "SUCCEEDED", job
        report = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=tenant.headers)
        expected = report.json()["unlearned_model"]["weights_sha256"]
        weights = client.get(
            f"/v1/models/{tenant.model_id}/versions/2/weights", headers=tenant.headers
        )
        assert hashlib.sha256(weights.content).hexdigest() == expected
    db.dispose()
    work = folder / "var" / "artifacts" / "jobs" / job_id
    assert (work / "report.json").is_file() and not list(work.rglob("*.safetensors"))


def retained(job: dict) -> bool:
    return job["state"] in TERMINAL and job["data_deletion"] is not None


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_api_and_its_worker(embedded):
    """A service manager stops `negmerge serve` with SIGTERM to its main process: the worker
    it started must stop too, not live on as an orphan."""
    _, folder, process = embedded
    log = folder / "serve.log"
    deadline = time.monotonic() + 90
    while " ready." not in log.read_text():  # celery's worker says so once it consumes
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    children = descendants(process.pid)
    assert children
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=45) == 0, log.read_text()[-3000:]
    left = [pid for pid in children if running(pid)]
    assert not left, f"processes left running: {left}"
