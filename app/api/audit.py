"""/v1/audit: the tenant's audit trail, for keys with the audit:read scope."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.api.common import AUTH_ERRORS, PagingDep, errors
from app.auth import Principal, require
from app.db.repositories import AuditFilter, AuditRepository
from app.dependencies import DbSession
from app.schemas.audit import AuditEntryOut
from app.schemas.common import ListResponse

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get(
    "",
    response_model=ListResponse[AuditEntryOut],
    responses=errors(*AUTH_ERRORS, 422),
    summary="Read the audit trail, newest first",
)
def list_audit(
    principal: Annotated[Principal, Depends(require("audit:read"))],
    session: DbSession,
    paging: PagingDep,
    action: Annotated[str | None, Query(max_length=64, examples=["job.created"])] = None,
    resource_type: Annotated[str | None, Query(max_length=64)] = None,
    resource_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[datetime | None, Query(description="Entries at or after this time.")] = None,
    until: Annotated[datetime | None, Query(description="Entries before this time.")] = None,
) -> ListResponse[AuditEntryOut]:
    """Every state change and state-changing request of this tenant, hash-chained: each
    entry's prev_hash is the hash of the entry before it."""
    where = AuditFilter(action, resource_type, resource_id, _aware(since), _aware(until))
    page = paging.page(functools.partial(AuditRepository(session, principal.tenant_id).page, where))
    items = [
        AuditEntryOut(
            seq=e.seq,
            at=e.at,
            actor=e.actor,
            action=e.action,
            resource_type=e.resource_type,
            resource_id=e.resource_id,
            details=e.details,
            prev_hash=e.prev_hash,
            hash=e.hash,
        )
        for e in page.items
    ]
    return ListResponse(items=items, next_page_token=page.next_page_token)


def _aware(moment: datetime | None) -> datetime | None:
    """Times without a zone are taken as UTC."""
    from datetime import UTC

    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment
