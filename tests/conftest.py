"""Shared by every test package. The service's tests (tests/app, tests/worker) run against
the real PostgreSQL and Redis on 127.0.0.1: a fresh database per session, brought to the
current schema with `alembic upgrade head` and dropped at the end. If a server is down those
tests skip, except under CI=true, where they fail."""

import os
import secrets
from collections.abc import Iterator
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
