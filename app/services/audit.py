"""The append-only audit trail, hash-chained so that an edited or deleted row is detected.

There is one chain per tenant (chain = the tenant's id) plus a "system" chain for events
that belong to no tenant (creating a tenant). Per-tenant chains keep tenants from
serialising on each other's writes and let a tenant's auditor verify its own chain.

Row n stores prev_hash = hash of row n-1 (64 zeros for the first) and
hash = sha256(canonical JSON of its chain, seq, prev_hash, time, tenant, actor, action,
resource and details). `audit_chain_heads` holds each chain's last seq and hash; appends lock
that row, so a chain never forks, and verification compares it with the last row, so even
deleting the newest rows is caught. (Someone who can rewrite every row *and* the head can
rebuild a consistent chain; publishing the heads elsewhere, e.g. from `audit verify`'s
output, closes that.)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import AuditEntry
from app.db.repositories import AuditChainRepository, audit_chains

GENESIS_HASH = "0" * 64
SYSTEM_CHAIN = "system"


def chain_of(tenant_id: uuid.UUID | None) -> str:
    return str(tenant_id) if tenant_id is not None else SYSTEM_CHAIN


def entry_hash(entry: AuditEntry) -> str:
    """The sha256 of an entry's canonical content (everything but its id and own hash)."""
    content = {
        "chain": entry.chain,
        "seq": entry.seq,
        "prev_hash": entry.prev_hash,
        "at": entry.at.isoformat(),
        "tenant_id": str(entry.tenant_id) if entry.tenant_id else None,
        "actor": entry.actor,
        "action": entry.action,
        "resource_type": entry.resource_type,
        "resource_id": entry.resource_id,
        "details": entry.details,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def record(
    session: Session,
    *,
    tenant_id: uuid.UUID | None,
    actor: str,
    action: str,
    resource_type: str,
    resource_id: object = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry to the tenant's chain (in the caller's transaction)."""
    chain = chain_of(tenant_id)
    head = AuditChainRepository(session, chain).lock_head(GENESIS_HASH)
    entry = AuditEntry(
        chain=chain,
        seq=head.seq + 1,
        tenant_id=tenant_id,
        at=utcnow(),
        actor=actor,
        action=action,
        resource_type=resource_type,
        resource_id=str(resource_id) if resource_id is not None else None,
        # Round-tripped through JSON so the hash covers exactly what the database returns.
        details=json.loads(json.dumps(details or {}, default=str)),
        prev_hash=head.hash,
    )
    entry.hash = entry_hash(entry)
    head.seq, head.hash = entry.seq, entry.hash
    session.add(entry)
    session.flush()
    return entry


@dataclass(frozen=True)
class ChainReport:
    chain: str
    entries: int
    head_hash: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(session: Session, chain: str) -> ChainReport:
    """Recompute every hash and link of `chain`, and compare its end with the head."""
    problems: list[str] = []
    expected_seq, prev_hash, count = 1, GENESIS_HASH, 0
    rows = AuditChainRepository(session, chain)
    for entry in rows.entries():
        count += 1
        where = f"chain {chain} seq {entry.seq} (id {entry.id})"
        if entry.seq != expected_seq:
            problems.append(f"{where}: expected seq {expected_seq}: rows are missing")
        if entry.prev_hash != prev_hash:
            problems.append(f"{where}: prev_hash does not match the previous row")
        if entry_hash(entry) != entry.hash:
            problems.append(f"{where}: content does not match its hash: the row was edited")
        expected_seq, prev_hash = entry.seq + 1, entry.hash
    head = rows.head()
    if head is None:
        if count:
            problems.append(f"chain {chain}: its head is missing")
    elif head.seq != expected_seq - 1 or head.hash != prev_hash:
        problems.append(
            f"chain {chain}: ends at seq {expected_seq - 1} but its head says seq {head.seq}: "
            "the newest rows were deleted or altered"
        )
    return ChainReport(chain, count, prev_hash, problems)


def verify_all(session: Session) -> Iterator[ChainReport]:
    """Verify every chain that has a head or an entry."""
    for chain in sorted(audit_chains(session)):
        yield verify_chain(session, chain)
