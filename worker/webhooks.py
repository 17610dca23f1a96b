"""The webhook deliverer: sends the outbox's due deliveries (see app.services.webhook_delivery).

The watchdog runs it at the end of each pass, so the worker deployment and `negmerge serve`
deliver webhooks with nothing more to start. Each attempt is three steps: claim (a short
transaction), send (no transaction or connection held), record (another short one).

Before each send the URL is vetted again (app.ssrf) and the connection goes to the address
that was vetted, with the original host in the Host header and TLS SNI, so a DNS answer that
changed since (rebinding) cannot point it at the service's own network. Redirects are not
followed; connecting and reading are each bounded by webhook_timeout_seconds; the answer's
body is never read.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook

from app.db.session import Database
from app.services import webhook_delivery
from app.services.webhook_delivery import AttemptOutcome, ClaimedDelivery
from app.settings import Settings
from app.ssrf import UnsafeUrl, vet_url

log = logging.getLogger(__name__)

USER_AGENT = "NegMerge-Webhooks/1.0"


def signature_header(claimed: ClaimedDelivery, timestamp: int) -> str:
    """webhook-signature: one "v1,<base64>" per secret, space-separated (Standard Webhooks)."""
    at = datetime.fromtimestamp(timestamp, UTC)
    return " ".join(
        Webhook(secret).sign(claimed.webhook_id, at, claimed.body) for secret in claimed.secrets
    )


def send(claimed: ClaimedDelivery, settings: Settings) -> AttemptOutcome:
    """One attempt: POST the signed body to the vetted address; never raises."""
    began = time.perf_counter()

    def elapsed_ms() -> float:
        return (time.perf_counter() - began) * 1000

    try:
        target = vet_url(claimed.url, allow_private=settings.webhook_allow_private)
    except UnsafeUrl as exc:
        return AttemptOutcome(None, f"refused: {exc}", elapsed_ms())
    original = httpx.URL(claimed.url)
    timestamp = int(time.time())
    headers = {
        "Host": original.netloc.decode("ascii"),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": claimed.webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(claimed, timestamp),
    }
    try:
        with (
            httpx.Client(
                timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
            ) as client,
            client.stream(
                "POST",
                original.copy_with(host=target.address),
                content=claimed.body.encode(),
                headers=headers,
                extensions={"sni_hostname": target.host},
            ) as response,
        ):
            status = response.status_code
    except httpx.TimeoutException:
        error = f"timed out after {settings.webhook_timeout_seconds:g} s"
        return AttemptOutcome(None, error, elapsed_ms(), target.address)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:1000]
        return AttemptOutcome(None, error, elapsed_ms(), target.address)
    error = None if 200 <= status < 300 else f"HTTP {status}"
    return AttemptOutcome(status, error, elapsed_ms(), target.address)


def deliver_due(db: Database, settings: Settings) -> Counter:
    """Make up to webhook_batch_size due attempts; returns how many ended each way."""
    done: Counter = Counter()
    for _ in range(settings.webhook_batch_size):
        with db.unit_of_work() as session:
            claimed = webhook_delivery.claim_next(session, settings)
        if claimed is None:
            break
        outcome = send(claimed, settings)
        with db.unit_of_work() as session:
            what = webhook_delivery.record_attempt(session, claimed, outcome, settings)
        done[f"webhook_{what}"] += 1
        if not outcome.delivered:
            log.warning(
                "webhook %s attempt %d to %s: %s (%s)",
                claimed.webhook_id,
                claimed.attempt,
                claimed.url,
                outcome.error,
                what,
            )
    return done
