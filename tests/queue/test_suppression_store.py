"""The suppression store, both engines: what `SuppressionStore` promises, checked against
shared.db and a real PostgreSQL, with two stores on one database standing for two
processes (one writes, the other follows `changes`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.queue.base import Suppression, SuppressionStore
from relay.queue.postgres import schema
from relay.queue.postgres.suppression import PostgresSuppressions
from relay.queue.sqlite.shared import SharedDB
from relay.queue.sqlite.suppression import SQLiteSuppressions
from tests.fakes.postgres import create_database

MakeStore = Callable[[], Awaitable[SuppressionStore]]


async def _sqlite(tmp_path: Path) -> AsyncIterator[MakeStore]:
    opened: list[SharedDB] = []

    async def make() -> SuppressionStore:
        shared = SharedDB(tmp_path / "shared.db")
        opened.append(shared)
        return SQLiteSuppressions(shared)

    yield make
    for shared in opened:
        shared.close()


async def _postgres(server: str) -> AsyncIterator[MakeStore]:
    dsn = await create_database(server)
    pools: list[asyncpg.Pool] = []
    conn = await asyncpg.connect(dsn)
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()

    async def make() -> SuppressionStore:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        pools.append(pool)

        async def run(fn: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
            async with pool.acquire() as c, c.transaction():
                await c.execute("SET LOCAL synchronous_commit = on")
                return await fn(c)

        return PostgresSuppressions(run)

    yield make
    for pool in pools:
        await pool.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    if request.param == "sqlite":
        async for make in _sqlite(tmp_path):
            yield make
    else:
        async for make in _postgres(request.getfixturevalue("postgres")):
            yield make


def entry(address: str, scope: str = "", *, reason: str = "hard_bounce", **kw: Any) -> Suppression:
    return Suppression(
        address=address,
        scope=scope,
        reason=reason,
        source=kw.pop("source", "test"),
        created=kw.pop("created", time.time()),
        **kw,
    )


async def test_add_lowercases_and_renews(make_store: MakeStore) -> None:
    store = await make_store()
    assert (
        await store.add([entry("Bob@Example.ORG"), entry("ann@example.org", "Shop.Example")]) == 2
    )
    listed = await store.list()
    assert [(e.address, e.scope) for e in listed] == [
        ("ann@example.org", "shop.example"),
        ("bob@example.org", ""),
    ]
    _, _, cursor = await store.changes(0)
    await store.add([entry("bob@example.org", reason="complaint", detail="again")])
    added, removed, later = await store.changes(cursor)
    assert later > cursor and removed == []
    assert [(e.address, e.reason, e.detail) for e in added] == [
        ("bob@example.org", "complaint", "again")
    ]
    assert len(await store.list()) == 2


async def test_a_second_process_follows_adds_and_removals(make_store: MakeStore) -> None:
    writer, follower = await make_store(), await make_store()
    await writer.add([entry("a@example.org"), entry("a@example.org", "shop.example")])
    everything, removed, cursor = await follower.changes(0)
    assert {(e.address, e.scope) for e in everything} == {
        ("a@example.org", ""),
        ("a@example.org", "shop.example"),
    }
    assert removed == []
    assert await follower.changes(cursor) == ([], [], cursor)  # nothing new: nothing read

    assert await writer.remove("A@example.org", scope="shop.example") == 1
    added, removed, cursor = await follower.changes(cursor)
    assert added == [] and removed == [("a@example.org", "shop.example")]

    assert await writer.remove("a@example.org") == 1  # every scope left: the global one
    assert await writer.remove("a@example.org") == 0
    added, removed, cursor = await follower.changes(cursor)
    assert removed == [("a@example.org", "")]
    # A tombstone is not an entry: a fresh start loads nothing, the list shows nothing.
    assert (await follower.changes(0))[0] == []
    assert await follower.list() == []

    await writer.add([entry("a@example.org")])  # re-added after removal
    added, removed, _ = await follower.changes(cursor)
    assert [e.address for e in added] == ["a@example.org"] and removed == []


async def test_list_filters_and_pages_across_scopes(make_store: MakeStore) -> None:
    store = await make_store()
    await store.add(
        [
            entry("x_1@example.org"),
            entry("x%1@example.org"),
            entry("bob@example.org"),
            entry("bob@example.org", "a.example"),
            entry("bob@example.org", "b.example"),
            entry("carol@example.org"),
        ]
    )
    # The filter is a substring, literally (no LIKE wildcards), case-insensitive.
    assert [e.address for e in await store.list(contains="X_")] == ["x_1@example.org"]
    pages, after = [], None
    while True:
        page = await store.list(after=after, limit=2)
        if not page:
            break
        pages.append([(e.address, e.scope) for e in page])
        after = page[-1].cursor
    assert pages == [
        [("bob@example.org", ""), ("bob@example.org", "a.example")],
        [("bob@example.org", "b.example"), ("carol@example.org", "")],
        [("x%1@example.org", ""), ("x_1@example.org", "")],
    ]
    # A bare address as the cursor starts after every scope of it.
    assert [e.address for e in await store.list(after="bob@example.org")] == [
        "carol@example.org",
        "x%1@example.org",
        "x_1@example.org",
    ]


async def test_purge_forgets_expired_entries_and_old_tombstones(make_store: MakeStore) -> None:
    store = await make_store()
    now = time.time()
    await store.add(
        [
            entry("old@example.org", expires=now - 1),
            entry("later@example.org", expires=now + 3600),
            entry("gone@example.org"),
            entry("forever@example.org"),
        ]
    )
    await store.remove("gone@example.org")
    _, _, cursor = await store.changes(0)
    assert await store.purge(now=now) == 1  # the expired one; the tombstone is fresh
    assert await store.purge(now=now + 2 * 86400) >= 1  # the tombstone (and later's entry)
    assert [e.address for e in await store.list()] == ["forever@example.org"]
    # Purging never makes the next change invisible to a process that was current.
    await store.add([entry("new@example.org")])
    added, _, _ = await store.changes(cursor)
    assert [e.address for e in added] == ["new@example.org"]
