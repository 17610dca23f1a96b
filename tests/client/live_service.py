"""A real NegMerge service over HTTP for the client's tests: uvicorn serving create_app(settings)
in a background thread on a free 127.0.0.1 port, against the tests' PostgreSQL and Redis."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", name="service_url")
def service_url_fixture(settings: Settings) -> Iterator[str]:
    """The base URL of a running service. Its own app (and connection pool), so shutting it
    down does not close the session's app; Retry-After is 1 s so that waits stay short."""
    app = create_app(settings.model_copy(update={"retry_after_seconds": 1}))
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="negmerge-test-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the test service did not start", pytrace=False)
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
