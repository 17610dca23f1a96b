"""Database.look_up: concurrent lookups of one statement are read together, one query per
batch, each answered with its own row and never with one read before it asked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.db.session import Database, Lookup


@pytest.fixture
def database(postgres_url: str) -> Iterator[Database]:
    """One read connection, so that concurrent lookups queue and are batched."""
    database = Database(postgres_url, pool_size=1, read_pool_size=1)
    yield database
    database.dispose()


def keys_lookup(sql: str) -> Lookup[str]:
    """A lookup over text keys: `sql` reads the bound keys from `unnest(:keys)` as `k`."""
    return Lookup(
        statement=text(sql),
        bind=lambda keys: {"keys": keys},
        key=lambda row: row.k,
    )


# Every row carries its statement's start time (rows read by the same query share it); each
# query holds the connection for 10 ms, so that lookups arriving meanwhile queue.
ECHO = keys_lookup(
    "SELECT k, statement_timestamp() AS read_at "
    "FROM unnest(CAST(:keys AS text[])) AS k, pg_sleep(0.01) WHERE k NOT LIKE 'missing%'"
)


async def look_up_all(database: Database, lookup: Lookup[str], keys: list[str]) -> list:
    try:
        return await asyncio.gather(
            *(database.look_up(lookup, key) for key in keys), return_exceptions=True
        )
    finally:
        await database.aclose()


def test_concurrent_lookups_share_queries_and_get_their_own_rows(database: Database) -> None:
    keys = [f"k{i % 40}" for i in range(200)] + ["missing-1", "missing-2"]
    rows = asyncio.run(look_up_all(database, ECHO, keys))
    for key, row in zip(keys, rows, strict=True):
        if key.startswith("missing"):
            assert row is None
        else:
            assert row.k == key
    queries = {row.read_at for row in rows if row is not None}
    # The first lookup reads alone; the rest wait for the one connection and share queries.
    assert 2 <= len(queries) <= 10, len(queries)


def test_every_answer_is_read_after_its_lookup_arrived(database: Database) -> None:
    """A lookup arriving while a read of its key is in flight waits for a read of its own.
    Each query carries its number, given when it is bound, just before it is sent."""
    bound: list[list[str]] = []

    def bind(keys: list[str]) -> dict:
        bound.append(keys)
        return {"keys": keys, "query": len(bound)}

    numbered = Lookup(
        statement=text(
            "SELECT k, CAST(:query AS int) AS query "
            "FROM unnest(CAST(:keys AS text[])) AS k, pg_sleep(0.01)"
        ),
        bind=bind,
        key=lambda row: row.k,
    )

    async def staggered() -> list[tuple[int, object]]:
        async def one(i: int) -> tuple[int, object]:
            await asyncio.sleep(i * 0.003)
            queries_before = len(bound)
            return queries_before, await database.look_up(numbered, "same")

        try:
            return await asyncio.gather(*(one(i) for i in range(30)))
        finally:
            await database.aclose()

    answers = asyncio.run(staggered())
    assert all(row.query > queries_before for queries_before, row in answers)
    assert len(bound) < len(answers)  # and some were batched


def test_a_failed_query_fails_its_batch_only(database: Database) -> None:
    numbers = keys_lookup(
        "SELECT k, CAST(k AS int) AS n FROM unnest(CAST(:keys AS text[])) AS k, pg_sleep(0.01)"
    )

    async def fail_then_read() -> tuple[list, list]:
        # The first lookup reads alone; the next three wait and share a query, which fails
        # on "x". Then, on the same reader (its one connection must have come back), more.
        try:
            failed = await asyncio.gather(
                *(database.look_up(numbers, k) for k in ["1", "2", "x", "3"]),
                return_exceptions=True,
            )
            after = await asyncio.wait_for(
                asyncio.gather(*(database.look_up(numbers, k) for k in ["4", "5"])), timeout=10
            )
            return failed, after
        finally:
            await database.aclose()

    (first, *batch), after = asyncio.run(fail_then_read())
    assert first.n == 1
    assert all(isinstance(answer, DBAPIError) for answer in batch), batch
    assert [row.n for row in after] == [4, 5]


def test_a_cancelled_lookup_does_not_disturb_the_others(database: Database) -> None:
    async def with_one_cancelled() -> list:
        try:
            tasks = [asyncio.create_task(database.look_up(ECHO, f"k{i}")) for i in range(4)]
            await asyncio.sleep(0)  # all four have asked: the first reads, the others wait
            tasks[2].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await database.aclose()

    answers = asyncio.run(with_one_cancelled())
    assert isinstance(answers[2], asyncio.CancelledError)
    assert [answers[i].k for i in (0, 1, 3)] == ["k0", "k1", "k3"]
