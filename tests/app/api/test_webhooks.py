"""Webhooks: the outbox written with a job's end, signed delivery to a real HTTP receiver on
127.0.0.1, retries with the same webhook-id, the delivery log, SSRF refusals, endpoints."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.auth import Principal
from app.db.base import utcnow
from app.db.models import AuditEntry, DeliveryState, JobState, UnlearningJob, WebhookDelivery
from app.services import job_states, webhook_delivery
from tests.app.api.test_events import Driver, submit
from worker.watchdog import run_once
from worker.webhooks import deliver_due


@dataclass
class Receiver:
    """An HTTP server in a thread: records each request and answers with the next status of
    `statuses` (the last one repeats)."""

    url: str
    statuses: list[int]
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="", statuses=[204])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append((dict(self.headers.items()), body))
            status = state.statuses[min(len(state.requests), len(state.statuses)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/negmerge"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def loopback_allowed(settings, monkeypatch):  # type: ignore[no-untyped-def]
    """The receiver lives on 127.0.0.1; retries are due after 0.2 s, not minutes."""
    monkeypatch.setattr(settings, "webhook_allow_private", True)
    monkeypatch.setattr(settings, "webhook_retry_base_seconds", 0.2)
    monkeypatch.setattr(settings, "webhook_timeout_seconds", 5.0)
    return settings


def signing_secret(client, caller) -> str:  # type: ignore[no-untyped-def]
    response = client.get("/v1/webhook-signing-secret", headers=caller.headers)
    assert response.status_code == 200, response.text
    return response.json()["secret"]


def job_deliveries(client, caller, job_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    response = client.get(
        f"/v1/unlearning-jobs/{job_id}/webhook-deliveries", headers=caller.headers
    )
    assert response.status_code == 200, response.text
    return response.json()["items"]


def cancel(client, caller, job_id: str) -> None:  # type: ignore[no-untyped-def]
    response = client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=caller.headers)
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED"


def count_deliveries(db) -> int:  # type: ignore[no-untyped-def]
    with db.unit_of_work() as session:
        return session.scalar(select(func.count()).select_from(WebhookDelivery))


def test_a_jobs_webhook_is_signed_and_delivered_once_when_it_ends(
    app, client, registered, db, receiver, loopback_allowed
):
    caller = registered.caller
    secret = signing_secret(client, caller)
    assert secret.startswith("whsec_")
    job = submit(client, registered, webhook_url=receiver.url)
    assert job_deliveries(client, caller, job["id"]) == []  # nothing until it ends

    cancel(client, caller, job["id"])
    [pending] = job_deliveries(client, caller, job["id"])
    assert pending["state"] == "PENDING" and pending["attempts"] == 0
    assert pending["endpoint_id"] is None and pending["url"] == receiver.url

    # The watchdog's pass delivers it (the worker deployment and `negmerge serve` run it).
    repairs = run_once(db, app.state.queue, loopback_allowed)
    assert repairs["webhook_delivered"] == 1
    [(headers, body)] = receiver.requests
    message = Webhook(secret).verify(body, headers)
    assert message["type"] == "unlearning_job.cancelled"
    assert message["data"]["id"] == job["id"] and message["data"]["state"] == "CANCELLED"
    assert message["data"]["error"] is None and message["data"]["result"] is None
    assert message["data"]["links"]["report"] == f"/v1/unlearning-jobs/{job['id']}/report"
    assert headers["webhook-id"] == pending["webhook_id"]
    assert headers["Content-Type"] == "application/json"
    assert headers["Host"] == receiver.url.split("/")[2]
    with pytest.raises(WebhookVerificationError):  # a tampered body fails verification
        Webhook(secret).verify(body.replace(b"CANCELLED", b"SUCCEEDED"), headers)

    [done] = job_deliveries(client, caller, job["id"])
    assert done["state"] == "SUCCEEDED" and done["delivered_at"] is not None
    assert done["attempts"] == 1 and done["next_attempt_at"] is None
    [attempt] = done["attempt_log"]
    assert attempt["status_code"] == 204 and attempt["error"] is None
    assert attempt["duration_ms"] >= 0
    assert done["payload"]["type"] == "unlearning_job.cancelled"

    assert deliver_due(db, loopback_allowed) == {}  # delivered: never sent again
    assert len(receiver.requests) == 1


def test_a_failing_receiver_gets_the_retry_with_the_same_webhook_id(
    app, client, registered, db, receiver, loopback_allowed
):
    receiver.statuses = [500, 200]
    caller = registered.caller
    secret = signing_secret(client, caller)
    job = submit(client, registered, webhook_url=receiver.url)
    Driver(app, job["id"]).fail("prepare", "data_error", "sample 'x': not an image")

    assert deliver_due(db, loopback_allowed) == {"webhook_retry": 1}
    [waiting] = job_deliveries(client, caller, job["id"])
    assert waiting["state"] == "PENDING" and waiting["attempts"] == 1
    assert waiting["last_status_code"] == 500 and waiting["last_error"] == "HTTP 500"
    assert waiting["next_attempt_at"] is not None
    assert deliver_due(db, loopback_allowed) == {}  # not due yet: backoff
    assert len(receiver.requests) == 1

    time.sleep(0.3)
    assert deliver_due(db, loopback_allowed) == {"webhook_delivered": 1}
    first, second = receiver.requests
    assert first[0]["webhook-id"] == second[0]["webhook-id"] == waiting["webhook_id"]
    assert first[1] == second[1]  # the same message, signed again at its new timestamp
    message = Webhook(secret).verify(second[1], second[0])
    assert message["type"] == "unlearning_job.failed"
    assert message["data"]["error"] == {
        "code": "data_error",
        "message": "sample 'x': not an image",
    }

    [done] = job_deliveries(client, caller, job["id"])
    assert done["state"] == "SUCCEEDED" and done["attempts"] == 2
    assert [(a["attempt"], a["status_code"], a["error"]) for a in done["attempt_log"]] == [
        (1, 500, "HTTP 500"),
        (2, 200, None),
    ]
    assert done["attempt_log"][0]["at"] < done["attempt_log"][1]["at"]


def test_a_delivery_is_given_up_after_the_last_attempt(
    app, client, registered, db, receiver, loopback_allowed, monkeypatch
):
    receiver.statuses = [503]
    monkeypatch.setattr(loopback_allowed, "webhook_retry_base_seconds", 0.0)
    monkeypatch.setattr(loopback_allowed, "webhook_max_attempts", 3)
    job = submit(client, registered, webhook_url=receiver.url)
    cancel(client, registered.caller, job["id"])
    assert deliver_due(db, loopback_allowed) == {"webhook_retry": 2, "webhook_gave_up": 1}
    [given_up] = job_deliveries(client, registered.caller, job["id"])
    assert given_up["state"] == "FAILED" and given_up["attempts"] == 3
    assert [a["status_code"] for a in given_up["attempt_log"]] == [503, 503, 503]
    assert deliver_due(db, loopback_allowed) == {}
    assert len(receiver.requests) == 3


def test_backoff_doubles_up_to_its_cap(settings):
    tuned = settings.model_copy(
        update={"webhook_retry_base_seconds": 30.0, "webhook_retry_max_seconds": 200.0}
    )
    assert [webhook_delivery.backoff_seconds(n, tuned) for n in (1, 2, 3, 4, 5)] == [
        30.0,
        60.0,
        120.0,
        200.0,
        200.0,
    ]
    assert webhook_delivery.backoff_seconds(5000, tuned) == 200.0  # no float overflow, however many


def test_an_endpoint_gets_every_job_end_signed_with_its_own_secret(
    app, client, registered, db, receiver, loopback_allowed
):
    caller = registered.caller
    created = client.post(
        "/v1/webhook-endpoints",
        json={"url": receiver.url, "description": "tickets"},
        headers=caller.headers,
    )
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and len(endpoint["secret"]) > 40
    assert created.headers["Location"] == f"/v1/webhook-endpoints/{endpoint['id']}"
    shown = client.get(f"/v1/webhook-endpoints/{endpoint['id']}", headers=caller.headers).json()
    assert "secret" not in shown and shown["url"] == receiver.url
    listed = client.get("/v1/webhook-endpoints", headers=caller.headers).json()["items"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and "secret" not in listed[0]

    job = submit(client, registered)  # no webhook_url of its own
    Driver(app, job["id"]).succeed(variants=job["progress"]["variants_total"])
    assert deliver_due(db, loopback_allowed) == {"webhook_delivered": 1}
    [(headers, body)] = receiver.requests
    message = Webhook(endpoint["secret"]).verify(body, headers)
    assert message["type"] == "unlearning_job.succeeded"
    assert message["data"]["result"]["model_version"] == 2
    assert message["data"]["result"]["lambda"] == 0.4
    with pytest.raises(WebhookVerificationError):  # not the tenant's signing secret
        Webhook(signing_secret(client, caller)).verify(body, headers)

    by_endpoint = client.get(
        f"/v1/webhook-endpoints/{endpoint['id']}/deliveries", headers=caller.headers
    ).json()["items"]
    assert [(d["job_id"], d["state"]) for d in by_endpoint] == [(job["id"], "SUCCEEDED")]

    deleted = client.delete(f"/v1/webhook-endpoints/{endpoint['id']}", headers=caller.headers)
    assert deleted.status_code == 204
    gone = client.get(f"/v1/webhook-endpoints/{endpoint['id']}", headers=caller.headers)
    assert gone.status_code == 404
    assert client.get("/v1/webhook-endpoints", headers=caller.headers).json()["items"] == []
    later = submit(client, registered)
    cancel(client, caller, later["id"])
    assert job_deliveries(client, caller, later["id"]) == []  # deleted: nothing more

    with db.unit_of_work() as session:
        actions = session.scalars(
            select(AuditEntry.action)
            .where(AuditEntry.resource_type == "webhook_endpoint")
            .order_by(AuditEntry.id)
        ).all()
    assert actions == ["webhook_endpoint.created", "webhook_endpoint.deleted"]


def test_deleting_an_endpoint_gives_up_its_pending_deliveries(
    client, registered, db, receiver, loopback_allowed
):
    caller = registered.caller
    endpoint = client.post(
        "/v1/webhook-endpoints", json={"url": receiver.url}, headers=caller.headers
    ).json()
    job = submit(client, registered)
    cancel(client, caller, job["id"])
    client.delete(f"/v1/webhook-endpoints/{endpoint['id']}", headers=caller.headers)
    assert deliver_due(db, loopback_allowed) == {}
    assert receiver.requests == []
    [dropped] = job_deliveries(client, caller, job["id"])
    assert dropped["state"] == "FAILED" and dropped["last_error"] == "the endpoint was deleted"


def test_private_addresses_are_refused_naming_the_field(client, registered, db, settings):
    assert settings.webhook_allow_private is False
    caller = registered.caller
    for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://169.254.169.254/"):
        job = client.post(
            "/v1/unlearning-jobs",
            json={**submit_body(registered), "webhook_url": url},
            headers=caller.headers,
        )
        assert job.status_code == 422, (url, job.text)
        problem = job.json()["error"]["fields"][0]
        assert problem["field"] == "webhook_url", problem
        assert "public addresses" in problem["problem"]
    endpoint = client.post(
        "/v1/webhook-endpoints", json={"url": "https://10.0.0.8/in"}, headers=caller.headers
    )
    assert endpoint.status_code == 422
    assert endpoint.json()["error"]["fields"][0] == {
        "field": "url",
        "problem": "the address 10.0.0.8 (private); webhooks may only call public addresses",
    }
    not_http = client.post(
        "/v1/webhook-endpoints", json={"url": "ftp://example.com/x"}, headers=caller.headers
    )
    assert not_http.status_code == 422 and not_http.json()["error"]["fields"][0]["field"] == "url"
    with db.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(UnlearningJob)) == 0


def submit_body(registered) -> dict:  # type: ignore[no-untyped-def]
    from tests.app.conftest import job_body

    return job_body(registered)


def test_the_address_is_checked_again_when_delivering(
    client, registered, db, receiver, loopback_allowed, monkeypatch
):
    """Accepted while private addresses were allowed; by delivery time they are not (as when
    a name is re-pointed at an internal address after it was vetted): nothing is sent."""
    job = submit(client, registered, webhook_url=receiver.url)
    cancel(client, registered.caller, job["id"])
    monkeypatch.setattr(loopback_allowed, "webhook_allow_private", False)
    assert deliver_due(db, loopback_allowed) == {"webhook_retry": 1}
    assert receiver.requests == []
    [refused] = job_deliveries(client, registered.caller, job["id"])
    assert refused["last_error"] == (
        "refused: the address 127.0.0.1 (loopback); webhooks may only call public addresses"
    )
    assert refused["attempt_log"][0]["status_code"] is None


def test_a_rolled_back_end_of_a_job_creates_no_delivery(
    app, client, registered, db, receiver, loopback_allowed
):
    job = submit(client, registered, webhook_url=receiver.url)
    caller = registered.caller
    principal = Principal(caller.tenant_id, caller.key_id, frozenset({"admin"}))
    with pytest.raises(RuntimeError, match="after the cancel"), db.unit_of_work() as session:
        ended = job_states.cancel_job(session, principal, uuid.UUID(job["id"]))
        assert ended.state is JobState.CANCELLED
        session.flush()
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        raise RuntimeError("something failed after the cancel")
    assert count_deliveries(db) == 0
    assert client.get(f"/v1/unlearning-jobs/{job['id']}", headers=caller.headers).json()[
        "state"
    ] == ("QUEUED")
    assert deliver_due(db, loopback_allowed) == {}
    assert receiver.requests == []
    cancel(client, caller, job["id"])  # the committed cancel does create it
    assert count_deliveries(db) == 1


def test_two_deliverers_never_claim_the_same_attempt(client, registered, db, loopback_allowed):
    job = submit(client, registered, webhook_url="http://127.0.0.1:9/unused")
    cancel(client, registered.caller, job["id"])
    first = db.sessions()
    second = db.sessions()
    try:
        claimed = webhook_delivery.claim_next(first, loopback_allowed)
        assert claimed is not None and claimed.attempt == 1
        # The first holds the row's lock: the second skips it instead of waiting for it.
        assert webhook_delivery.claim_next(second, loopback_allowed) is None
        second.rollback()
        first.commit()
        # Committed, the claim moved the row's next attempt past this one's end.
        assert webhook_delivery.claim_next(second, loopback_allowed) is None
    finally:
        first.close()
        second.close()
    with db.unit_of_work() as session:
        row = session.get(WebhookDelivery, claimed.delivery_id)
        assert row.attempts == 1 and row.state is DeliveryState.PENDING


def test_rotation_signs_with_both_secrets_during_the_grace_period(
    app, client, registered, db, receiver, loopback_allowed
):
    caller = registered.caller
    old = signing_secret(client, caller)
    rotated = client.post("/v1/webhook-signing-secret:rotate", headers=caller.headers)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previous_secret_expires_at"] is not None
    assert signing_secret(client, caller) == new
    job = submit(client, registered, webhook_url=receiver.url)
    cancel(client, caller, job["id"])
    deliver_due(db, loopback_allowed)
    [(headers, body)] = receiver.requests
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["data"]["id"] == job["id"]
    with db.unit_of_work() as session:
        actions = session.scalars(
            select(AuditEntry.action).where(AuditEntry.resource_type == "webhook_signing_secret")
        ).all()
    assert sorted(actions) == ["webhook_signing_secret.created", "webhook_signing_secret.rotated"]


def test_other_tenants_see_none_of_it_and_scopes_are_enforced(
    client, register, make_caller, receiver, loopback_allowed
):
    a = register(make_caller("tenant-a"))
    b = make_caller("tenant-b")
    endpoint = client.post(
        "/v1/webhook-endpoints", json={"url": receiver.url}, headers=a.caller.headers
    ).json()
    job = submit(client, a, webhook_url=receiver.url)
    cancel(client, a.caller, job["id"])
    for method, path in [
        ("get", f"/v1/webhook-endpoints/{endpoint['id']}"),
        ("delete", f"/v1/webhook-endpoints/{endpoint['id']}"),
        ("get", f"/v1/webhook-endpoints/{endpoint['id']}/deliveries"),
        ("get", f"/v1/unlearning-jobs/{job['id']}/webhook-deliveries"),
    ]:
        response = getattr(client, method)(path, headers=b.headers)
        assert response.status_code == 404, (path, response.text)
    assert client.get("/v1/webhook-endpoints", headers=b.headers).json()["items"] == []
    assert signing_secret(client, b) != signing_secret(client, a.caller)
    assert len(job_deliveries(client, a.caller, job["id"])) == 2  # A's were not touched

    writer = make_caller("tenant-a", ("jobs:write",))
    for method, path in [
        ("get", "/v1/webhook-endpoints"),
        ("post", "/v1/webhook-endpoints"),
        ("get", "/v1/webhook-signing-secret"),
        ("post", "/v1/webhook-signing-secret:rotate"),
    ]:
        response = getattr(client, method)(path, headers=writer.headers)
        assert response.status_code == 403, (path, response.text)
    # ... but a job's own delivery log is part of the job.
    assert len(job_deliveries(client, writer, job["id"])) == 2


def test_the_payload_is_stored_once_and_sent_byte_for_byte(
    client, registered, db, loopback_allowed
):
    job = submit(client, registered, webhook_url="http://127.0.0.1:9/unused")
    cancel(client, registered.caller, job["id"])
    with db.unit_of_work() as session:
        row = session.scalars(select(WebhookDelivery)).one()
        claimed = webhook_delivery.claim_next(session, loopback_allowed)
    assert claimed is not None and claimed.webhook_id == f"msg_{row.id.hex}"
    assert json.loads(claimed.body) == row.payload
    assert set(row.payload) == {"type", "timestamp", "data"}
    assert set(row.payload["data"]) == {
        "id",
        "state",
        "subject_reference",
        "finished_at",
        "verdict",
        "result",
        "error",
        "links",
    }


def test_an_attempt_whose_deliverer_died_is_made_again_and_logged_as_unfinished(
    client, registered, db, receiver, loopback_allowed
):
    job = submit(client, registered, webhook_url=receiver.url)
    cancel(client, registered.caller, job["id"])
    with db.unit_of_work() as session:
        # ... and then the process died
        lost = webhook_delivery.claim_next(session, loopback_allowed)
    assert lost is not None
    assert deliver_due(db, loopback_allowed) == {}  # its claim has not lapsed yet
    with db.unit_of_work() as session:
        session.get(WebhookDelivery, lost.delivery_id).next_attempt_at = utcnow()  # lapsed
    assert deliver_due(db, loopback_allowed) == {"webhook_delivered": 1}
    [(headers, _)] = receiver.requests
    assert headers["webhook-id"] == lost.webhook_id
    [done] = job_deliveries(client, registered.caller, job["id"])
    assert [(a["attempt"], a["status_code"], a["error"]) for a in done["attempt_log"]] == [
        (1, None, "no outcome recorded: the deliverer stopped during the attempt"),
        (2, 204, None),
    ]
