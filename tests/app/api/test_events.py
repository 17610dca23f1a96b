"""GET /v1/unlearning-jobs/{id}/events: Server-Sent Events from the job_events table.

Jobs are moved along by the workers' own service functions (app.services.steps), exactly as
a worker would, while the stream is open."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app.schemas.results import JobResult, StoredVersion
from app.services import steps
from tests.app.conftest import job_body


class Driver:
    """Moves one job through its steps the way workers do (claim, complete, fail, finish)."""

    def __init__(self, app: Any, job_id: str) -> None:
        self.db = app.state.db
        self.settings = app.state.settings
        self.queue = app.state.queue
        self.job_id = uuid.UUID(job_id)
        self.claims: dict[str, steps.Claim] = {}

    def claim(self, step: str) -> None:
        with self.db.unit_of_work() as session:
            claim = steps.claim_step(
                session, self.job_id, step, f"test-{uuid.uuid4().hex}/0", self.settings
            )
        assert claim is not None, step
        self.claims[step] = claim

    def complete(self, step: str, output: dict | None = None) -> None:
        with self.db.unit_of_work() as session:
            steps.complete_step(session, self.claims[step], output or {}, self.queue)

    def run(self, step: str) -> None:
        self.claim(step)
        self.complete(step)

    def lambda_evaluated(self, lam: float) -> None:
        with self.db.unit_of_work() as session:
            steps.lambda_evaluated(session, self.job_id, lam)

    def fail(self, step: str, code: str = "data_error", message: str = "bad image") -> None:
        self.claim(step)
        with self.db.unit_of_work() as session:
            steps.step_failed(session, self.claims[step], code, message)

    def succeed(self, variants: int, result: JobResult | None = None) -> None:
        """prepare, every variant, merge, search, finalize: the job is SUCCEEDED."""
        self.run(steps.PREPARE)
        for k in range(variants):
            self.run(steps.finetune_step(k))
        self.run(steps.MERGE)
        self.run(steps.SEARCH)
        self.claim(steps.FINALIZE)
        # A version 2 as the worker would have stored it (the driver stores no bytes).
        stored = StoredVersion(
            model_id=uuid.uuid4(), version=2, version_id=uuid.uuid4(), weights_sha256="0" * 64
        )
        result = result or JobResult(model=stored, lambda_=0.4, kept_fraction=0.31)
        with self.db.unit_of_work() as session:
            assert steps.finish_job(session, self.claims[steps.FINALIZE], {}, result) is not None


def submit(client, registered, **changes: object) -> dict:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/unlearning-jobs",
        json=job_body(registered, **changes),
        headers=registered.caller.headers,
    )
    assert response.status_code == 202, response.text
    return response.json()


def parse(lines: Iterator[str], count: int | None = None) -> list[dict]:
    """SSE messages from `lines` (the next `count` of them, or all until the stream ends);
    heartbeat comments are counted under the key "comments" of the next message."""
    messages: list[dict] = []
    current: dict = {}
    comments = 0
    for line in lines:
        if line == "":
            if "id" in current:
                messages.append({**current, "comments": comments})
                comments = 0
                if count is not None and len(messages) == count:
                    return messages
            current = {}
        elif line.startswith(":"):
            comments += 1
        else:
            field, _, value = line.partition(": ")
            current[field] = json.loads(value) if field == "data" else value
    return messages


@pytest.fixture
def fast_events(settings, monkeypatch):  # type: ignore[no-untyped-def]
    """Looks every 20 ms; a stream gives up after 30 s so that a failing test cannot hang."""
    monkeypatch.setattr(settings, "events_poll_seconds", 0.02)
    monkeypatch.setattr(settings, "events_max_stream_seconds", 30.0)
    return settings


def kinds(messages: list[dict]) -> list[tuple]:
    return [(m["event"], m["data"]["state"], m["data"]["stage"]) for m in messages]


def test_the_stream_follows_a_job_live_in_order_and_ends_at_its_terminal_state(
    app, client, registered, fast_events
):
    job = submit(client, registered)
    driver = Driver(app, job["id"])
    url = f"/v1/unlearning-jobs/{job['id']}/events"
    with client.stream("GET", url, headers=registered.caller.headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        lines = response.iter_lines()
        assert next(lines) == "retry: 3000"
        received = parse(lines, 1)  # the past: the job was QUEUED

        # Each change is made only after the previous one has arrived: the stream is live.
        driver.claim(steps.PREPARE)
        received += parse(lines, 2)
        driver.complete(steps.PREPARE)
        driver.run(steps.finetune_step(0))
        received += parse(lines, 2)
        driver.lambda_evaluated(0.25)
        received += parse(lines, 1)
        driver.fail(steps.finetune_step(1), "data_error", "sample 'x': not an image")
        received += parse(lines)  # the rest, until the server ends the stream

    assert kinds(received) == [
        ("state", "QUEUED", None),
        ("state", "RUNNING", None),
        ("stage", "RUNNING", "preparing"),
        ("stage", "RUNNING", "finetuning"),
        ("progress", "RUNNING", "finetuning"),
        ("progress", "RUNNING", "finetuning"),
        ("state", "FAILED", "finetuning"),
    ]
    ids = [int(m["id"]) for m in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [m["data"]["id"] for m in received] == ids
    assert all(m["data"]["job_id"] == job["id"] for m in received)
    variant_done, lam = received[4]["data"], received[5]["data"]
    assert variant_done["details"] == {"variants_done": 1, "variants_total": 4}
    assert variant_done["progress"]["variants_done"] == 1
    assert variant_done["progress"]["variants_total"] == 4
    assert lam["details"] == {"lambda": 0.25, "lambdas_evaluated": 1}
    assert lam["progress"]["lambdas_evaluated"] == 1
    assert received[-1]["data"]["details"] == {
        "from": "RUNNING",
        "to": "FAILED",
        "error_code": "data_error",
    }
    # The report's timeline and the stream are the same events.
    report = client.get(
        f"/v1/unlearning-jobs/{job['id']}/report", headers=registered.caller.headers
    )
    assert [(e["kind"], e["state"], e["stage"]) for e in report.json()["timeline"]] == kinds(
        received
    )


def test_an_idle_stream_sends_heartbeats_and_a_cancel_ends_it(
    app, client, registered, fast_events, monkeypatch
):
    monkeypatch.setattr(fast_events, "events_heartbeat_seconds", 0.05)
    job = submit(client, registered)
    url = f"/v1/unlearning-jobs/{job['id']}/events"
    with client.stream("GET", url, headers=registered.caller.headers) as response:
        lines = response.iter_lines()
        assert parse(lines, 1)[0]["data"]["state"] == "QUEUED"
        for line in lines:  # nothing happens to the job: only heartbeats come
            if line.startswith(":"):
                break
        assert line == ": keep-alive"
        cancelled = client.post(
            f"/v1/unlearning-jobs/{job['id']}:cancel", headers=registered.caller.headers
        )
        assert cancelled.status_code == 200, cancelled.text
        rest = parse(lines)
    assert [(m["event"], m["data"]["state"]) for m in rest] == [("state", "CANCELLED")]


def test_resuming_after_an_event_id_sends_only_later_events(app, client, registered):
    job = submit(client, registered)
    driver = Driver(app, job["id"])
    driver.run(steps.PREPARE)
    driver.run(steps.finetune_step(0))
    driver.fail(steps.finetune_step(1))
    url = f"/v1/unlearning-jobs/{job['id']}/events"
    headers = registered.caller.headers

    # The job has ended, so the whole stream comes back at once and closes.
    everything = parse(iter(client.get(url, headers=headers).text.splitlines()))
    assert len(everything) == 6 and everything[-1]["data"]["state"] == "FAILED"
    cursor = everything[2]["id"]

    def resumed(**kwargs: Any) -> list[dict]:
        response = client.get(url, **kwargs)
        assert response.status_code == 200, response.text
        return parse(iter(response.text.splitlines()))

    by_header = resumed(headers={**headers, "Last-Event-ID": cursor})
    assert [m["id"] for m in by_header] == [m["id"] for m in everything[3:]]
    assert [m["data"] for m in by_header] != [] and by_header[0]["data"]["id"] > int(cursor)
    by_query = resumed(headers=headers, params={"last_event_id": cursor})
    assert [m["id"] for m in by_query] == [m["id"] for m in everything[3:]]
    # The header is what EventSource sends on reconnecting: it wins over the URL's cursor.
    later = everything[4]["id"]
    both = resumed(headers={**headers, "Last-Event-ID": later}, params={"last_event_id": cursor})
    assert [m["id"] for m in both] == [m["id"] for m in everything[5:]]
    # Past the terminal event: nothing more will come, so the stream ends empty.
    assert resumed(headers={**headers, "Last-Event-ID": everything[-1]["id"]}) == []


def test_other_tenants_unknown_jobs_and_bad_cursors_are_refused(client, registered, make_caller):
    job = submit(client, registered)
    other = make_caller("other-tenant", ("jobs:read",))
    url = f"/v1/unlearning-jobs/{job['id']}/events"
    hidden = client.get(url, headers=other.headers)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
    missing = client.get(f"/v1/unlearning-jobs/{uuid.uuid4()}/events", headers=other.headers)
    assert missing.status_code == 404
    bad = client.get(url, headers={**registered.caller.headers, "Last-Event-ID": "abc"})
    assert bad.status_code == 422
    assert bad.json()["error"]["fields"][0]["field"] == "Last-Event-ID"
    no_scope = make_caller("acme", ("models:read",))
    assert client.get(url, headers=no_scope.headers).status_code == 403
    assert client.get(url).status_code == 401
