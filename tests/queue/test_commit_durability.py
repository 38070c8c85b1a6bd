"""Which SQLite commits wait for the disk: every write by default (the 250 is sent after
it), and a batch made only of writes the machine's loss may undo (claims, round records)
without the fsync, so an insert does not queue behind one."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relay.queue.sqlite.store import Spool

FULL, NORMAL = 2, 1


def synchronous(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("PRAGMA synchronous").fetchone()[0]
    return value


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "queue")
    s.start()
    yield s
    await s.close()


async def test_writes_are_durable_unless_said_otherwise(spool: Spool) -> None:
    assert await spool.write(synchronous) == FULL
    assert await spool.write(synchronous, durable=False) == NORMAL
    assert await spool.write(synchronous) == FULL


async def test_durable_writes_commit_ahead_of_the_others_that_arrived_with_them(
    spool: Spool,
) -> None:
    """An insert queued behind claims commits first, in its own durable transaction; the
    claims follow without the fsync."""
    held, release = threading.Event(), threading.Event()
    order: list[str] = []

    def block(conn: sqlite3.Connection) -> None:
        held.set()
        release.wait(10)

    def step(name: str) -> Callable[[sqlite3.Connection], int]:
        def run(conn: sqlite3.Connection) -> int:
            order.append(name)
            return synchronous(conn)

        return run

    first = asyncio.ensure_future(spool.write(block, durable=False))
    await asyncio.to_thread(held.wait, 10)
    # All three wait while the writer is busy, so they are taken together.
    claim = asyncio.ensure_future(spool.write(step("claim"), durable=False))
    insert = asyncio.ensure_future(spool.write(step("insert")))
    record = asyncio.ensure_future(spool.write(step("record"), durable=False))
    await asyncio.sleep(0)
    release.set()
    await first
    assert (await insert, await claim, await record) == (FULL, NORMAL, NORMAL)
    assert order == ["insert", "claim", "record"]
    assert spool.batches == 3 and spool.batched_writes == 4


async def test_a_non_durable_commit_survives_the_process(spool: Spool, tmp_path: Path) -> None:
    """Skipping the fsync risks the write only if the machine goes down: the WAL has it,
    and another connection (a restarted process) reads it."""

    def put(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (v TEXT)")
        conn.execute("INSERT INTO probe VALUES ('kept')")

    await spool.write(put, durable=False)
    with sqlite3.connect(spool.path) as other:
        assert other.execute("SELECT v FROM probe").fetchall() == [("kept",)]


def insert_then_fail(value: str) -> Callable[[sqlite3.Connection], None]:
    def run(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO kv VALUES (?)", (value,))
        raise ValueError(f"{value} refused")

    return run


def insert(value: str) -> Callable[[sqlite3.Connection], str]:
    def run(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO kv VALUES (?)", (value,))
        return value

    return run


def stored(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT v FROM kv ORDER BY v")]


async def test_a_failing_write_is_undone_alone_whether_it_commits_alone_or_in_a_batch(
    spool: Spool,
) -> None:
    await spool.write(lambda conn: conn.execute("CREATE TABLE kv (v TEXT)"))
    # Alone: no savepoint, the whole transaction rolled back; the writer goes on.
    with pytest.raises(ValueError, match="lone refused"):
        await spool.write(insert_then_fail("lone"))
    assert await spool.write(insert("a")) == "a"
    # In a batch: its savepoint rolled back, the others committed.
    held, release = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        held.set()
        release.wait(10)

    blocker = asyncio.ensure_future(spool.write(block, durable=False))
    await asyncio.to_thread(held.wait, 10)
    batch = [
        asyncio.ensure_future(spool.write(fn))
        for fn in (insert("b"), insert_then_fail("bad"), insert("c"))
    ]
    await asyncio.sleep(0)
    release.set()
    await blocker
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert results[0] == "b" and results[2] == "c" and isinstance(results[1], ValueError)
    assert await spool.read(stored) == ["a", "b", "c"]
