"""API keys and scopes.

A key is `nmk_` + 43 random URL-safe characters (256 bits); only its sha256 is stored (a
slow hash adds nothing for keys of this entropy). Clients send `Authorization: Bearer <key>`
or `X-API-Key: <key>`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.db.repositories import ApiKeyRepository
from app.dependencies import DbSession
from app.errors import Forbidden, Unauthenticated

KEY_PREFIX = "nmk_"

# What each scope allows; a scope grants the scopes it implies too.
SCOPES: dict[str, str] = {
    "jobs:write": "submit and cancel unlearning jobs (implies jobs:read)",
    "jobs:read": "read jobs, their reports, and model and data set metadata",
    "models:write": "register models and data sets (implies models:read)",
    "models:read": "read models and data sets and download weights",
    "audit:read": "read the tenant's audit trail",
    "admin": "everything within the tenant",
}
IMPLIES: dict[str, set[str]] = {
    "jobs:write": {"jobs:read"},
    "models:write": {"models:read"},
    "admin": set(SCOPES),
}


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


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer nmk_...`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def authenticate(
    request: Request,
    session: DbSession,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> Principal:
    key = bearer.credentials if bearer is not None else header_key
    if not key:
        raise Unauthenticated("Authorization: send an API key as 'Bearer <key>' or X-API-Key")
    row = ApiKeyRepository(session).find_by_hash(hash_key(key))
    if row is None:
        raise Unauthenticated("Authorization: unknown or revoked API key")
    principal = Principal(row.tenant_id, row.id, expand_scopes(row.scopes))
    request.state.principal = principal
    return principal


def require(*any_of: str) -> Callable[..., Principal]:
    """A dependency giving the caller, who must hold at least one of the scopes `any_of`."""

    def dependency(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.scopes & set(any_of):
            raise Forbidden(f"this API key lacks the scope {' or '.join(any_of)}")
        return principal

    return dependency
