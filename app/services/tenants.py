"""Tenants and their API keys (administrators' commands)."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from app.auth import SCOPES, generate_key, hash_key, key_cache
from app.db.base import utcnow
from app.db.models import ApiKey, Tenant
from app.db.repositories import ApiKeyRepository, TenantRepository
from app.db.session import after_commit
from app.services import audit


class AdminError(ValueError):
    """A command that cannot be carried out; the message says why."""


def create_tenant(session: Session, name: str, actor: str) -> Tenant:
    if TenantRepository(session).get_by_name(name) is not None:
        raise AdminError(f"a tenant named {name!r} already exists")
    tenant = TenantRepository(session).add(Tenant(name=name))
    audit.record(
        session,
        tenant_id=None,
        actor=actor,
        action="tenant.created",
        resource_type="tenant",
        resource_id=tenant.id,
        details={"name": name},
    )
    return tenant


def find_tenant(session: Session, name_or_id: str) -> Tenant:
    repo = TenantRepository(session)
    tenant = repo.get_by_name(name_or_id)
    if tenant is None:
        try:
            tenant = repo.get(uuid.UUID(name_or_id))
        except ValueError:
            tenant = None
    if tenant is None:
        raise AdminError(f"no tenant named {name_or_id!r}")
    return tenant


def create_key(
    session: Session, tenant: Tenant, scopes: list[str], name: str, actor: str
) -> tuple[ApiKey, str]:
    """A new key for `tenant`; returns the row and the key itself (shown once, never stored)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise AdminError(f"unknown scope {unknown[0]!r}; choose from {', '.join(SCOPES)}")
    if not scopes:
        raise AdminError("give at least one scope")
    key = generate_key()
    row = ApiKeyRepository(session).add(
        ApiKey(
            tenant_id=tenant.id,
            name=name,
            prefix=key[:12],
            key_hash=hash_key(key),
            scopes=sorted(set(scopes)),
        )
    )
    audit.record(
        session,
        tenant_id=tenant.id,
        actor=actor,
        action="api_key.created",
        resource_type="api_key",
        resource_id=row.id,
        details={"name": name, "scopes": row.scopes, "prefix": row.prefix},
    )
    return row, key


def revoke_key(session: Session, key_id: uuid.UUID, actor: str) -> ApiKey:
    row = ApiKeyRepository(session).get(key_id)
    if row is None:
        raise AdminError(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(
            session,
            tenant_id=row.tenant_id,
            actor=actor,
            action="api_key.revoked",
            resource_type="api_key",
            resource_id=row.id,
            details={"prefix": row.prefix},
        )
        # This process stops accepting the key at once; other processes within key_cache.ttl.
        after_commit(session, lambda: key_cache.forget(key_id))
    return row
