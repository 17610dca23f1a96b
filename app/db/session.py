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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine, Executable, create_engine, event
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

K = TypeVar("K")

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


@dataclass(frozen=True, eq=False)
class Lookup(Generic[K]):
    """A read-only statement that finds the rows of many keys in one round trip: `bind(keys)`
    gives its parameters, `key(row)` the key a row answers."""

    statement: Executable
    bind: Callable[[list[K]], Mapping[str, Any]]
    key: Callable[[Row], K]


class _AsyncReader:
    """An event loop's autocommit asyncio pool, and the lookups waiting for it.

    A lookup that finds a connection free reads at once. Under load the connections are all
    busy; lookups then queue, and whichever connection frees first answers everything queued
    for that statement in one round trip (at most `MAX_BATCH` keys). Every answer comes from
    a read that started after its request arrived, so batching never serves a stale row."""

    MAX_BATCH = 128

    def __init__(self, url: str, pool_size: int) -> None:
        # Readers wait for a pooled connection rather than open overflow ones (each a new
        # server process, closed again on return).
        self.engine = create_async_engine(
            url, isolation_level="AUTOCOMMIT", pool_size=pool_size, max_overflow=0
        )
        self.free = pool_size
        # Per statement, first come first served; statements take turns.
        self.waiting: dict[Lookup[Any], list[tuple[Any, asyncio.Future[Row | None]]]] = {}
        self.running: set[asyncio.Task[None]] = set()

    async def look_up(self, lookup: Lookup[K], key: K) -> Row | None:
        answer: asyncio.Future[Row | None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(lookup, []).append((key, answer))
        self._dispatch()
        return await answer

    def _dispatch(self) -> None:
        while self.free and self.waiting:
            lookup, queue = next(iter(self.waiting.items()))
            batch, rest = queue[: self.MAX_BATCH], queue[self.MAX_BATCH :]
            del self.waiting[lookup]
            if rest:
                self.waiting[lookup] = rest
            self.free -= 1
            task = asyncio.create_task(self._answer(lookup, batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _answer(
        self, lookup: Lookup[K], batch: list[tuple[K, asyncio.Future[Row | None]]]
    ) -> None:
        try:
            # Callers that went away (a client disconnect cancels its future) are not read for.
            keys = list(dict.fromkeys(key for key, answer in batch if not answer.done()))
            if keys:
                rows = await self._read(lookup.statement, lookup.bind(keys))
                found = {lookup.key(row): row for row in rows}
                for key, answer in batch:
                    if not answer.done():
                        answer.set_result(found.get(key))
        except Exception as exc:
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
        except BaseException:  # cancelled itself (the loop is closing): so are its callers
            for _, answer in batch:
                answer.cancel()
            raise
        finally:
            self.free += 1
            self._dispatch()

    async def _read(self, statement: Executable, params: Mapping[str, Any]) -> list[Row]:
        for attempt in (1, 2):
            try:
                async with self.engine.connect() as connection:
                    return list(await connection.execute(statement, params))
            except DBAPIError as exc:
                # No pre-ping on this pool (a round trip per read): a connection the server
                # dropped (a restart) fails once, is discarded, and the read is tried again.
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")


class Database:
    """An engine and its sessions."""

    def __init__(self, url: str, pool_size: int = 10, read_pool_size: int = 4) -> None:
        self.url = url
        self.read_pool_size = read_pool_size
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

    async def look_up(self, lookup: Lookup[K], key: K) -> Row | None:
        """The row `lookup` finds for `key`, if any, read outside any transaction: the hot path
        of polling clients. On PostgreSQL it runs on the event loop (psycopg's async mode: no
        worker thread, no BEGIN / COMMIT round trips), batched with concurrent lookups of the
        same statement; SQLite reads in a thread."""
        if self._sqlite:
            return await run_in_threadpool(self._look_up_sync, lookup, key)
        return await self._reader().look_up(lookup, key)

    def _look_up_sync(self, lookup: Lookup[K], key: K) -> Row | None:
        with self.engine.connect() as connection:
            return connection.execute(lookup.statement, lookup.bind([key])).one_or_none()

    def _reader(self) -> _AsyncReader:
        loop = asyncio.get_running_loop()
        reader = self._readers.get(loop)
        if reader is None:
            reader = self._readers[loop] = _AsyncReader(self.url, self.read_pool_size)
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
