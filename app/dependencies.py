"""Request-scoped dependencies: the settings, the unit of work, the queue."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.queue import JobQueue
from app.settings import Settings


# async: a plain `def` dependency would cost a worker-thread hop per request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


async def database_slot(request: Request) -> AsyncIterator[None]:
    """At most db_pool_size requests hold a session at once; the others wait here, on the
    event loop, without a worker thread.

    Why: a sync endpoint takes a thread from the pool for each step (dependencies, endpoint,
    serialisation). If every thread were held by requests waiting on the database (for a
    connection, or for a row lock held by another request), the request holding the lock
    could never get a thread to commit: a deadlock. Capping the requests that hold sessions
    below the thread count rules that out.
    """
    loop = asyncio.get_running_loop()
    limiter = _slots.get(loop)
    if limiter is None:
        limiter = _slots[loop] = anyio.CapacityLimiter(request.app.state.settings.db_pool_size)
    async with limiter:
        yield


async def get_session(
    request: Request, _slot: Annotated[None, Depends(database_slot, scope="function")]
) -> AsyncIterator[Session]:
    """The request's unit of work: commits when the endpoint returns, rolls back if it raises.

    Used with scope="function" (see DbSession), so the commit happens before the response is
    sent: a client never sees 202 for a job that was not committed.

    Opening the unit of work does no I/O (a session takes its connection at its first query),
    so it runs on the event loop; only its end (commit or rollback) goes to a worker thread,
    shielded from cancellation and outside the thread limit, as FastAPI does for a sync
    generator dependency. That saves one thread hop per request.
    """
    unit = request.app.state.db.unit_of_work()
    session = unit.__enter__()
    exit_limiter = anyio.CapacityLimiter(1)  # see fastapi.concurrency.contextmanager_in_threadpool
    try:
        yield session
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                unit.__exit__, type(exc), exc, exc.__traceback__, limiter=exit_limiter
            )
        raise
    else:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(unit.__exit__, None, None, None, limiter=exit_limiter)


# scope="function": the unit of work ends (commits) before the response is sent.
DbSession = Annotated[Session, Depends(get_session, scope="function")]
