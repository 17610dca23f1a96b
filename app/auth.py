"""API keys and scopes.

A key is `nmk_` + 43 random URL-safe characters (256 bits); only its sha256 is stored (a
slow hash adds nothing for keys of this entropy). Clients send `Authorization: Bearer <key>`
or `X-API-Key: <key>`.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.db.repositories import ApiKeyRepository
from app.db.session import Database
from app.errors import Forbidden, Unauthenticated

KEY_PREFIX = "nmk_"

# What each scope allows; a scope grants the scopes it implies too.
SCOPES: dict[str, str] = {
    "jobs:write": "submit and cancel unlearning jobs (implies jobs:read)",
    "jobs:read": "read jobs, their reports, and model and data set metadata",
    "models:write": "register models and data sets (implies models:read)",
    "models:read": "read models and data sets and download weights",
    "audit:read": "read the tenant's audit trail, and its jobs and their reports",
    "admin": "everything within the tenant",
}
IMPLIES: dict[str, set[str]] = {
    "jobs:write": {"jobs:read"},
    "models:write": {"models:read"},
    "admin": set(SCOPES),
}

# Who may read jobs, their reports and their events: auditors too (they read the evidence),
# though not models or data sets.
JOB_READERS = ("jobs:read", "audit:read")


def expand_scopes(scopes: list[str] | set[str]) -> frozenset[str]:
    granted = set(scopes)
    for scope in scopes:
        granted |= IMPLIES.get(scope, set())
    return frozenset(granted)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key of a tenant, with its scopes."""

    tenant_id: uuid.UUID
    key_id: uuid.UUID
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        return f"api_key:{self.key_id}"


class _KeyCache:
    """Recently authenticated keys, by hash, for a few seconds: polling clients send the same
    key many times a second, and looking it up each time cost one query per request.

    Only keys that were found are kept (an unknown key is looked up every time). A key revoked
    by this process is dropped at once (`forget`); one revoked elsewhere (the admin command,
    another worker process) keeps working here for at most `ttl` seconds.
    """

    def __init__(self, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                now = time.monotonic()
                self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[key_hash] = (time.monotonic() + self.ttl, principal)

    def forget(self, key_id: uuid.UUID) -> None:
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if v[1].key_id != key_id}


key_cache = _KeyCache()

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer nmk_...`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def principal_for_key(session: Session, key: str) -> Principal | None:
    """Who holds `key` (None for an unknown or revoked key), through the cache."""
    key_hash = hash_key(key)
    principal = key_cache.get(key_hash)
    if principal is None:
        row = ApiKeyRepository(session).find_by_hash(key_hash)
        if row is None:
            return None
        principal = Principal(row.tenant_id, row.id, expand_scopes(row.scopes))
        key_cache.put(key_hash, principal)
    return principal


def _look_up(database: Database, key: str) -> Principal | None:
    with database.unit_of_work() as session:
        return principal_for_key(session, key)


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> Principal:
    # async, with its own short transaction on a cache miss: a cached key (a polling client)
    # costs no worker thread and no database round trip.
    key = bearer.credentials if bearer is not None else header_key
    if not key:
        raise Unauthenticated("Authorization: send an API key as 'Bearer <key>' or X-API-Key")
    principal = key_cache.get(hash_key(key))
    if principal is None:
        principal = await run_in_threadpool(_look_up, request.app.state.db, key)
    if principal is None:
        raise Unauthenticated("Authorization: unknown or revoked API key")
    request.state.principal = principal
    return principal


def require(*any_of: str) -> Callable[..., Principal]:
    """A dependency giving the caller, who must hold at least one of the scopes `any_of`."""

    # async: it does no I/O, so it runs on the event loop instead of taking a worker thread.
    async def dependency(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.scopes & set(any_of):
            raise Forbidden(f"this API key lacks the scope {' or '.join(any_of)}")
        return principal

    return dependency
