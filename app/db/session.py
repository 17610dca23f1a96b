"""Engines, sessions, and the unit of work: the one place a request commits or rolls back.

Services add and change rows but never commit. Work that must only happen once the rows are
durable (sending a job to the broker, keeping an uploaded data set's files) is registered
with `after_commit` / `after_rollback` and run by the unit of work.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine, Executable, create_engine, event
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_AFTER_COMMIT = "after_commit"
_AFTER_ROLLBACK = "after_rollback"


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, real transactions and a folder."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    # pysqlite's own transaction handling breaks SAVEPOINT; let SQLAlchemy emit BEGIN itself
    # (the recipe from SQLAlchemy's SQLite documentation).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute("PRAGMA journal_mode = WAL")

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class _AsyncReader:
    """An event loop's autocommit asyncio pool, and the turns to use it."""

    def __init__(self, url: str, pool_size: int) -> None:
        # Readers wait for a pooled connection rather than open overflow ones (each a new
        # server process, closed again on return).
        self.engine = create_async_engine(
            url, isolation_level="AUTOCOMMIT", pool_size=pool_size, max_overflow=0
        )
        # First come, first served: waiting in the pool's own queue lets newcomers overtake
        # the woken waiter, which starves a few requests (p99 ten times the median under load).
        self.turns = asyncio.Semaphore(pool_size)


class Database:
    """An engine and its sessions."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.url = url
        self.pool_size = pool_size
        self.engine = make_engine(url, pool_size)
        # Rows stay readable after commit: responses are built from them afterwards.
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._sqlite = make_url(url).get_backend_name() == "sqlite"
        # Pooled asyncio connections belong to the event loop that opened them.
        self._readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncReader] = (
            weakref.WeakKeyDictionary()
        )

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """A session that commits if the block succeeds and rolls back if it raises; then runs
        the callbacks registered for that outcome."""
        session = self.sessions()
        try:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                _run(session.info.pop(_AFTER_ROLLBACK, []))
                raise
            _run(session.info.pop(_AFTER_COMMIT, []))
        finally:
            session.info.clear()
            session.close()

    async def fetch_one(self, statement: Executable, params: Mapping[str, Any]) -> Row | None:
        """Run one read-only statement outside any transaction and return its row, if any: the
        hot path of polling clients. On PostgreSQL it runs on the event loop (psycopg's async
        mode: no worker thread, no BEGIN / COMMIT round trips); SQLite reads in a thread."""
        if self._sqlite:
            return await run_in_threadpool(self._fetch_one_sync, statement, params)
        reader = self._reader()
        for attempt in (1, 2):
            try:
                async with reader.turns, reader.engine.connect() as connection:
                    return (await connection.execute(statement, params)).one_or_none()
            except DBAPIError as exc:
                # No pre-ping on this pool (a round trip per read): a connection the server
                # dropped (a restart) fails once, is discarded, and the read is tried again.
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    def _fetch_one_sync(self, statement: Executable, params: Mapping[str, Any]) -> Row | None:
        with self.engine.connect() as connection:
            return connection.execute(statement, params).one_or_none()

    def _reader(self) -> _AsyncReader:
        loop = asyncio.get_running_loop()
        reader = self._readers.get(loop)
        if reader is None:
            reader = self._readers[loop] = _AsyncReader(self.url, self.pool_size)
        return reader

    async def aclose(self) -> None:
        """Close the pooled asyncio connections of the running event loop."""
        reader = self._readers.pop(asyncio.get_running_loop(), None)
        if reader is not None:
            await reader.engine.dispose()

    def dispose(self) -> None:
        self.engine.dispose()


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the unit of work that owns `session` has committed (never if not)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def after_rollback(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` if the unit of work that owns `session` rolls back (e.g. delete files)."""
    session.info.setdefault(_AFTER_ROLLBACK, []).append(callback)


def _run(callbacks: list[Callable[[], None]]) -> None:
    # The transaction's outcome is settled; a failing callback is logged, not raised, so it
    # cannot turn a committed request into an error response.
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("callback %r failed", callback)
