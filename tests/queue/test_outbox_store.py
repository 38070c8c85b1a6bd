"""The webhook outbox (relay.queue.base.WebhookOutbox) against both engines: idempotent
adds, one lease per entry, order per message, retry and give-up, and what a crashed
owner leaves behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from relay.queue.base import WebhookOutbox
from relay.queue.postgres import schema
from relay.queue.postgres.outbox import PostgresOutbox
from relay.queue.sqlite.outbox import SQLiteOutbox
from relay.queue.sqlite.shared import SharedDB
from tests.fakes.postgres import create_database
from tests.queue.test_engines import MakeQueue

T = TypeVar("T")
MakeOutbox = Callable[[], Awaitable[WebhookOutbox]]
A, B = "host-a:1:1", "host-b:2:1"
T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgres"])
async def make_outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeOutbox]:
    """Builds outboxes that share one store, as the processes of a host (SQLite) or the
    hosts of a cluster (PostgreSQL) do: each call is another process's view."""
    closers: list[Callable[[], Awaitable[None]]] = []
    if request.param == "sqlite":

        async def make() -> WebhookOutbox:
            shared = SharedDB(tmp_path / "shared.db")

            async def close() -> None:
                shared.close()

            closers.append(close)
            return SQLiteOutbox(shared)

    else:
        dsn = await create_database(request.getfixturevalue("postgres"))
        conn = await asyncpg.connect(dsn)
        try:
            await schema.migrate(conn)
        finally:
            await conn.close()

        async def make() -> WebhookOutbox:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
            closers.append(pool.close)

            async def run(fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SET LOCAL synchronous_commit = on")
                    return await fn(conn)

            return PostgresOutbox(run)

    yield make
    for close in closers:
        await close()


def entry(hook: str, key: str, msg_id: str) -> tuple[str, str, str, bytes]:
    return (hook, key, msg_id, f'{{"id":"{key}"}}'.encode())


async def test_add_is_idempotent_on_hook_and_key(make_outbox: MakeOutbox) -> None:
    outbox = await make_outbox()
    assert await outbox.add([entry("app", "e1", "m1"), entry("app", "e2", "m1")], now=T0) == 2
    # The same event again (a provider's retried webhook), and once more within one batch.
    assert await outbox.add([entry("app", "e1", "m1")], now=T0 + 1) == 0
    assert await outbox.add([entry("app", "e3", "m2"), entry("app", "e3", "m2")], now=T0) == 1
    # Another hook takes the same event: one entry per hook.
    assert await outbox.add([entry("crm", "e1", "m1")], now=T0) == 1
    assert await outbox.add([], now=T0) == 0
    assert await outbox.pending() == {
        "app": {"waiting": 3, "dead": 0},
        "crm": {"waiting": 1, "dead": 0},
    }


async def test_an_event_published_again_after_it_was_posted_is_not_posted_again(
    make_outbox: MakeOutbox,
) -> None:
    """A provider retries its webhook (its events' effects run again, publishing included)
    after the relay already posted the event to the application: the outbox remembers it."""
    outbox = await make_outbox()
    assert await outbox.add([entry("app", "e1", "m1")], now=T0) == 1
    [first] = await outbox.claim(now=T0, owner="a", lease_time=60, limit=10)
    await outbox.done(first.seq, owner="a")
    assert await outbox.add([entry("app", "e1", "m1")], now=T0 + 5) == 0
    assert await outbox.claim(now=T0 + 5, owner="a", lease_time=60, limit=10) == []
    assert await outbox.next_due() is None
    assert await outbox.pending() == {}  # a sent entry is not waiting, nor dead
    # Forgotten with the dead ones; after that the key is free again.
    assert await outbox.purge(older_than=T0 + 1) == 1
    assert await outbox.add([entry("app", "e1", "m1")], now=T0 + 6) == 1


async def test_claim_takes_only_the_oldest_entry_of_each_message(make_outbox: MakeOutbox) -> None:
    outbox = await make_outbox()
    await outbox.add(
        [entry("app", "a1", "ma"), entry("app", "b1", "mb"), entry("app", "a2", "ma")], now=T0
    )
    await outbox.add([entry("crm", "a1", "ma")], now=T0)
    claimed = await outbox.claim(now=T0, owner=A, lease_time=60, limit=10)
    assert sorted((e.hook, e.key) for e in claimed) == [("app", "a1"), ("app", "b1"), ("crm", "a1")]
    first = next(e for e in claimed if (e.hook, e.key) == ("app", "a1"))
    assert (first.msg_id, first.body, first.created, first.attempts) == (
        "ma",
        b'{"id":"a1"}',
        T0,
        0,
    )
    # Nothing else is claimable while those are leased: a2 waits behind a1.
    assert await outbox.claim(now=T0, owner=B, lease_time=60, limit=10) == []
    await outbox.done(first.seq, owner=A)
    again = await outbox.claim(now=T0, owner=B, lease_time=60, limit=10)
    assert [(e.hook, e.key) for e in again] == [("app", "a2")]


async def test_claim_respects_the_limit_and_due_order(make_outbox: MakeOutbox) -> None:
    outbox = await make_outbox()
    await outbox.add([entry("app", f"e{i}", f"m{i}") for i in range(5)], now=T0)
    first = await outbox.claim(now=T0, owner=A, lease_time=60, limit=2)
    assert [e.key for e in first] == ["e0", "e1"]
    # e0 retried far ahead: e2..e4 come first, e0 only when due.
    await outbox.retry(first[0].seq, owner=A, next_attempt=T0 + 100, error="HTTP 500")
    rest = await outbox.claim(now=T0 + 1, owner=A, lease_time=60, limit=10)
    assert [e.key for e in rest] == ["e2", "e3", "e4"]
    for delivered in [first[1], *rest]:
        await outbox.done(delivered.seq, owner=A)
    assert await outbox.claim(now=T0 + 99, owner=A, lease_time=60, limit=10) == []
    late = await outbox.claim(now=T0 + 100, owner=A, lease_time=60, limit=10)
    assert [(e.key, e.attempts, e.last_error) for e in late] == [("e0", 1, "HTTP 500")]
    assert await outbox.claim(now=T0, owner=A, lease_time=60, limit=0) == []


async def test_a_retried_head_holds_back_the_later_events_of_its_message(
    make_outbox: MakeOutbox,
) -> None:
    outbox = await make_outbox()
    await outbox.add([entry("app", "a1", "ma"), entry("app", "a2", "ma")], now=T0)
    (head,) = await outbox.claim(now=T0, owner=A, lease_time=60, limit=10)
    await outbox.retry(head.seq, owner=A, next_attempt=T0 + 30, error="timed out")
    # a2 is due (added at T0) but is not its message's head.
    assert await outbox.claim(now=T0 + 10, owner=A, lease_time=60, limit=10) == []
    assert await outbox.next_due() == T0 + 30


async def test_give_up_keeps_the_entry_dead_and_unblocks_the_message(
    make_outbox: MakeOutbox,
) -> None:
    outbox = await make_outbox()
    await outbox.add([entry("app", "a1", "ma"), entry("app", "a2", "ma")], now=T0)
    (head,) = await outbox.claim(now=T0, owner=A, lease_time=60, limit=10)
    await outbox.give_up(head.seq, owner=A, error="gave up after 3d: HTTP 500")
    assert await outbox.pending() == {"app": {"waiting": 1, "dead": 1}}
    (after,) = await outbox.claim(now=T0, owner=A, lease_time=60, limit=10)
    assert after.key == "a2"
    # Dead and sent entries are never claimed; purge forgets both created before the cut.
    await outbox.done(after.seq, owner=A)
    assert await outbox.claim(now=T0 + 10**6, owner=A, lease_time=60, limit=10) == []
    assert await outbox.purge(older_than=T0) == 0
    assert await outbox.purge(older_than=T0 + 1) == 2
    assert await outbox.pending() == {}


async def test_only_the_lease_holder_finishes_an_entry(make_outbox: MakeOutbox) -> None:
    outbox = await make_outbox()
    await outbox.add([entry("app", "e1", "m1")], now=T0)
    (mine,) = await outbox.claim(now=T0, owner=A, lease_time=60, limit=10)
    await outbox.done(mine.seq, owner=B)
    await outbox.retry(mine.seq, owner=B, next_attempt=T0 + 999, error="not B's")
    await outbox.give_up(mine.seq, owner=B, error="not B's")
    assert await outbox.pending() == {"app": {"waiting": 1, "dead": 0}}
    await outbox.done(mine.seq, owner=A)
    assert await outbox.pending() == {}


async def test_a_dead_owners_lease_expires_and_another_owner_takes_over(
    make_outbox: MakeOutbox,
) -> None:
    crashed, survivor = await make_outbox(), await make_outbox()
    await crashed.add([entry("app", "e1", "m1"), entry("app", "e2", "m1")], now=T0)
    (taken,) = await crashed.claim(now=T0, owner=A, lease_time=60, limit=10)
    # The owner dies holding it: the head stays leased, then becomes due when the lease ends.
    assert await survivor.claim(now=T0 + 59, owner=B, lease_time=60, limit=10) == []
    assert await survivor.next_due() == T0 + 60
    (again,) = await survivor.claim(now=T0 + 60, owner=B, lease_time=60, limit=10)
    assert (again.seq, again.key) == (taken.seq, "e1")
    # The old owner's late answer changes nothing now.
    await crashed.done(taken.seq, owner=A)
    await survivor.done(again.seq, owner=B)
    (second,) = await survivor.claim(now=T0 + 60, owner=B, lease_time=60, limit=10)
    assert second.key == "e2"


async def test_next_due_is_the_earliest_claimable_time(make_outbox: MakeOutbox) -> None:
    outbox = await make_outbox()
    assert await outbox.next_due() is None
    await outbox.add([entry("app", "e1", "m1")], now=T0 + 5)
    await outbox.add([entry("app", "e2", "m2")], now=T0 + 7)
    assert await outbox.next_due() == T0 + 5
    (e1,) = await outbox.claim(now=T0 + 5, owner=A, lease_time=60, limit=1)
    assert await outbox.next_due() == T0 + 7
    await outbox.retry(e1.seq, owner=A, next_attempt=T0 + 3, error="x")
    assert await outbox.next_due() == T0 + 3


async def test_concurrent_claimers_never_take_the_same_entry(make_outbox: MakeOutbox) -> None:
    """Four processes (hosts) claiming in small batches at once take every entry once."""
    first = await make_outbox()
    views = [first, *[await make_outbox() for _ in range(3)]]
    await first.add([entry("app", f"e{i}", f"m{i}") for i in range(200)], now=T0)

    async def drain(outbox: WebhookOutbox, owner: str) -> list[str]:
        taken: list[str] = []
        while batch := await outbox.claim(now=T0, owner=owner, lease_time=60, limit=7):
            taken.extend(e.key for e in batch)
        return taken

    results = await asyncio.gather(*(drain(v, f"host-{i}") for i, v in enumerate(views)))
    everything = [key for keys in results for key in keys]
    assert len(everything) == 200
    assert set(everything) == {f"e{i}" for i in range(200)}


async def test_claim_and_next_due_stay_fast_with_ten_thousand_waiting(
    make_outbox: MakeOutbox,
) -> None:
    """A hook that has been down for hours: 10,000 entries of 2,500 messages, every head
    retried into the future, so each claim must step over all the blocked followers."""
    outbox = await make_outbox()
    await outbox.add(
        [entry("app", f"m{m}-{n}", f"m{m}") for n in range(4) for m in range(2500)], now=T0
    )
    heads = await outbox.claim(now=T0, owner=A, lease_time=60, limit=10_000)
    assert len(heads) == 2500
    for head in heads[:50]:
        await outbox.retry(head.seq, owner=A, next_attempt=T0 + 600, error="HTTP 503")
    started = time.perf_counter()
    assert await outbox.claim(now=T0 + 1, owner=B, lease_time=60, limit=16) == []
    assert await outbox.next_due() == T0 + 60  # the leased heads' leases end first
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"claim + next_due over 10,000 entries took {elapsed:.2f}s"


async def test_each_engine_serves_its_outbox_as_queue_outbox(make_queue: MakeQueue) -> None:
    """The outbox a running relay uses: shared.db beside the shards, or the cluster's
    database through the engine's durable transactions."""
    first, second = await make_queue(A), await make_queue(B)
    assert await first.outbox.add([entry("app", "e1", "m1")], now=T0) == 1
    (taken,) = await second.outbox.claim(now=T0, owner=B, lease_time=60, limit=10)
    assert taken.key == "e1"
    await second.outbox.done(taken.seq, owner=B)
    assert await first.outbox.pending() == {}
