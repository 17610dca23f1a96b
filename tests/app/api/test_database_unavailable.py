"""A database that drops its connections mid-request is a 503 with Retry-After on every
endpoint (the request can be retried: nothing was committed), never a 500; the next request
works again on fresh connections.

The connections are dropped for real: just before a chosen statement runs, every other
backend of the test database is terminated (pg_terminate_backend, as a restart or a failover
would), so the statement goes out on a dead connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import make_url

from app.db.models import UnlearningJob
from tests.app.conftest import job_body

TERMINATE_OTHERS = (
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


@contextmanager
def connections_dropped_before(database_url: str, fragment: str) -> Iterator[list[int]]:
    """While open, each statement containing `fragment` runs on a connection the server has
    just closed. Yields the number of backends terminated each time."""
    url = make_url(database_url).set(drivername="postgresql")
    killed: list[int] = []
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as killer:

        def terminate(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
            if fragment in statement:
                killed.append(killer.execute(TERMINATE_OTHERS).fetchone()[0])

        event.listen(Engine, "before_cursor_execute", terminate)
        try:
            yield killed
        finally:
            event.remove(Engine, "before_cursor_execute", terminate)


def unavailable(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "0x" not in error["message"]


def test_report_is_503_when_the_connection_drops(client, registered, settings):
    headers = registered.caller.headers
    job = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers).json()
    report = f"/v1/unlearning-jobs/{job['id']}/report"
    with connections_dropped_before(settings.database_url, "FROM job_events") as killed:
        unavailable(client.get(report, headers=headers))
    assert killed and killed[0] >= 1
    assert client.get(report, headers=headers).status_code == 200


def test_job_get_on_the_read_pool_is_503_when_every_attempt_drops(client, registered, settings):
    """The lean read path retries a dropped connection once; dropped again, it is a 503."""
    headers = registered.caller.headers
    job = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers).json()
    url = f"/v1/unlearning-jobs/{job['id']}"
    assert client.get(url, headers=headers).status_code == 200  # the read pool is open
    with connections_dropped_before(settings.database_url, "AS model_version") as killed:
        unavailable(client.get(url, headers=headers))
    assert len(killed) == 2  # the first attempt and its retry
    assert client.get(url, headers=headers).json()["id"] == job["id"]


def test_submission_is_503_and_writes_nothing_when_the_connection_drops(
    client, registered, settings, db
):
    headers = registered.caller.headers
    with connections_dropped_before(settings.database_url, "INSERT INTO unlearning_jobs"):
        unavailable(client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers))
    with db.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(UnlearningJob)) == 0
    again = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers)
    assert again.status_code == 202, again.text


def test_lists_are_503_when_the_connection_drops(client, registered, settings):
    headers = registered.caller.headers
    with connections_dropped_before(settings.database_url, "FROM models"):
        unavailable(client.get("/v1/models", headers=headers))
    with connections_dropped_before(settings.database_url, "FROM datasets"):
        unavailable(client.get("/v1/datasets", headers=headers))
    assert client.get("/v1/models", headers=headers).status_code == 200
