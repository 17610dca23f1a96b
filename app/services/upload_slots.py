"""A cap on the uploads one tenant has being unpacked and checked at once.

Unpacking and checking an archive is the expensive part of an upload (disk, CPU, one
decoded image at a time), so a tenant may run at most `limit` of them together. On
PostgreSQL a slot is a transaction-level advisory lock, `limit` of them per tenant: they
count across every API process and are released when the request's transaction ends,
however it ends (commit, rollback, a dropped connection). On SQLite (the embedded one-process
setup) slots are counted in this process.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from app.db.repositories import try_transaction_lock


@contextmanager
def upload_slot(session: Session, tenant_id: uuid.UUID, limit: int) -> Iterator[bool]:
    """Yields True while this upload holds one of the tenant's `limit` slots, False (and
    holds nothing) if all are taken."""
    if session.get_bind().dialect.name == "postgresql":
        yield any(
            try_transaction_lock(session, _lock_key(tenant_id, slot)) for slot in range(limit)
        )  # held until the transaction ends, after this block
        return
    with _local.take(tenant_id, limit) as taken:
        yield taken


def _lock_key(tenant_id: uuid.UUID, slot: int) -> int:
    """A signed 64-bit advisory lock key for the tenant's slot, apart from other lock users."""
    digest = hashlib.sha256(f"negmerge.upload:{tenant_id}:{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _ProcessSlots:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: Counter[uuid.UUID] = Counter()

    @contextmanager
    def take(self, tenant_id: uuid.UUID, limit: int) -> Iterator[bool]:
        with self.lock:
            taken = self.held[tenant_id] < limit
            if taken:
                self.held[tenant_id] += 1
        try:
            yield taken
        finally:
            if taken:
                with self.lock:
                    self.held[tenant_id] -= 1
                    if not self.held[tenant_id]:
                        del self.held[tenant_id]


_local = _ProcessSlots()
