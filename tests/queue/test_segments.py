"""Large bodies in segment files beside the shard: every queue operation through the real
SQLiteQueue, rotation, reclaim and compaction, a damaged segment, and a queue written before
segments existed."""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from relay.message import Status
from relay.queue.base import Round, StoreError
from relay.queue.sqlite import queries
from relay.queue.sqlite.engine import SQLiteQueue
from relay.queue.sqlite.segments import SegmentWriter, segment_dir, segment_seqs
from relay.queue.sqlite.store import db_path
from tests.queue.test_engines import NODE_A, claim, new, sent_round

KB = 1024
Open = Callable[..., Awaitable[SQLiteQueue]]


def body_of(size: int, tag: int = 0) -> bytes:
    """A message of `size` bytes that differs from every other tag's."""
    head = f"Subject: m{tag}\r\n\r\n".encode()
    line = f"line of message {tag:06d}\r\n".encode()
    return head + (line * (size // len(line) + 1))[: size - len(head)]


def locators(queue_dir: Path) -> dict[str, tuple[int | None, int]]:
    """id -> (segment, inline bytes) as the shard database records them."""
    with sqlite3.connect(db_path(queue_dir)) as conn:
        return {
            r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, seg, length(data) FROM bodies")
        }


def seg_files(queue_dir: Path) -> list[int]:
    return segment_seqs(segment_dir(db_path(queue_dir)))


@pytest.fixture
async def open_queue(tmp_path: Path) -> AsyncIterator[Open]:
    opened: list[SQLiteQueue] = []

    async def make(name: str = "queue", *, serve: bool = True) -> SQLiteQueue:
        q = SQLiteQueue(tmp_path / name, owner=NODE_A)
        if serve:
            await q.start()
        opened.append(q)
        return q

    yield make
    for q in opened:
        await q.close()


async def test_large_bodies_go_to_a_segment_and_small_ones_stay_inline(open_queue: Open) -> None:
    q = await open_queue()
    small, large = new(data=body_of(5 * KB, 1)), new(data=body_of(100 * KB, 2))
    assert await q.insert(small) and await q.insert(large)
    found = locators(q.queue_dir)
    assert found[small.id] == (None, 5 * KB)
    seq, inline = found[large.id]
    assert seq in seg_files(q.queue_dir) and inline == 0
    assert segment_dir(db_path(q.queue_dir)).is_dir()
    items = {item.id: item.data for item in await claim(q)}
    assert items == {small.id: small.data, large.id: large.data}
    assert await q.body(large.id) == large.data


async def test_every_operation_reads_moves_and_deletes_segment_bodies(open_queue: Open) -> None:
    q = await open_queue()
    msgs = [new(data=body_of(100 * KB, i)) for i in range(5)]
    for m in msgs:
        assert await q.insert(m)
    items = {i.id: i for i in await claim(q)}
    assert {k: v.data for k, v in items.items()} == {m.id: m.data for m in msgs}
    now = time.time()
    # sent: body gone; kept for provider events: still there until drop_bodies.
    assert await q.record_round(items[msgs[0].id], now=now, rounds=1, rnd=sent_round())
    kept = replace(sent_round(), keep_body=True)
    assert await q.record_round(items[msgs[1].id], now=now, rounds=1, rnd=kept)
    # failed, then retried by the operator: the body is read again at the next claim.
    failed = replace(sent_round(), failure="550 no", delivered=[])
    assert await q.record_round(items[msgs[2].id], now=now, rounds=1, rnd=failed)
    for m in msgs[3:]:
        assert await q.record_round(items[m.id], now=now, rounds=1, rnd=_deferred())
    assert await q.body(msgs[0].id) is None
    assert await q.body(msgs[1].id) == msgs[1].data
    assert await q.body(msgs[2].id) == msgs[2].data
    await q.retry(msgs[2].id, now=time.time(), actor="test")
    [again] = await claim(q)
    assert again.id == msgs[2].id and again.data == msgs[2].data

    # export from the serving queue, import into another: the bodies travel with them.
    exported = [r async for r in q.export()]
    assert {r["id"]: r["body"] for r in exported if r["body"]} == {m.id: m.data for m in msgs[1:]}
    other = await open_queue("other")
    for record in exported:
        assert await other.import_record(record)
    assert await other.body(msgs[3].id) == msgs[3].data

    assert await q.drop_bodies(sent_before=time.time() + 1) == 1
    assert await q.body(msgs[1].id) is None
    await q.delete(msgs[3].id, actor="test")
    assert await q.get(msgs[3].id) is None
    assert set(locators(q.queue_dir)) == {msgs[2].id, msgs[4].id}
    assert await q.purge_history(state=Status.SENT, older_than=time.time() + 1) == 2
    assert await q.body(msgs[4].id) == msgs[4].data


def _deferred() -> Round:
    return replace(
        sent_round(),
        retry=True,
        delivered=[],
        next_attempt=time.time() + 3600,
        pending=("r@example.org",),
        reason="451 try later",
    )


async def test_a_reader_in_another_process_reads_segment_bodies(open_queue: Open) -> None:
    """The CLI and the web worker open shards they do not serve, read-only or not."""
    q = await open_queue()
    msg = new(data=body_of(200 * KB, 7))
    assert await q.insert(msg)
    cli = await open_queue(serve=False)
    assert await cli.body(msg.id) == msg.data
    assert [r["body"] async for r in cli.export()] == [msg.data]


async def test_segments_rotate_and_empty_ones_are_unlinked(
    open_queue: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_SEGMENT_ROTATE_BYTES", str(250 * KB))
    q = await open_queue()
    msgs = [new(data=body_of(100 * KB, i)) for i in range(9)]
    for m in msgs:
        assert await q.insert(m)
    assert len(seg_files(q.queue_dir)) == 3  # three bodies fill 250 KB
    for item in await claim(q, limit=9):
        assert await q.record_round(item, now=time.time(), rounds=1, rnd=sent_round())
    await q.spool.reclaim()
    assert seg_files(q.queue_dir) == [q.spool.segments.active]  # type: ignore[union-attr]


async def test_a_sparse_segment_is_compacted_and_its_bodies_still_read(
    open_queue: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_SEGMENT_ROTATE_BYTES", str(250 * KB))
    q = await open_queue()
    msgs = [new(data=body_of(100 * KB, i)) for i in range(6)]
    for m in msgs:
        assert await q.insert(m)
    first, second = seg_files(q.queue_dir)[:2]
    directory = segment_dir(db_path(q.queue_dir))
    # One live body in each full segment (a third of it): both are compacted.
    keep = {msgs[1].id, msgs[4].id}
    for item in await claim(q, limit=6):
        if item.id not in keep:
            assert await q.record_round(item, now=time.time(), rounds=1, rnd=sent_round())
    used_before = sum(f.stat().st_size for f in directory.iterdir())
    # The last commits were delivery records (no fsync of their own); the compaction's
    # commit lets the old file go, so it must be durable whatever came before it.
    assert not q.spool._synced_commits
    assert await q.spool.reclaim() >= 1
    assert q.spool._synced_commits
    left = seg_files(q.queue_dir)
    assert first not in left and second not in left
    moved = locators(q.queue_dir)
    assert {moved[i][0] for i in keep} <= set(left)
    assert sum(f.stat().st_size for f in directory.iterdir()) < used_before
    for m in msgs:
        if m.id in keep:
            assert await q.body(m.id) == m.data


async def test_startup_removes_segments_no_row_names(open_queue: Open) -> None:
    """What a crash leaves: a segment written before its batch's COMMIT, never committed."""
    q = await open_queue()
    msg = new(data=body_of(100 * KB, 1))
    assert await q.insert(msg)
    await q.close()
    directory = segment_dir(db_path(q.queue_dir))
    orphan = directory / "1.seg"
    orphan.write_bytes(b"x" * 100 * KB)
    q = await open_queue()
    await q.spool.reclaim()
    assert not orphan.exists()
    [item] = await claim(q)
    assert item.data == msg.data


async def test_another_writers_active_segment_is_never_reclaimed(tmp_path: Path) -> None:
    one, two = SegmentWriter(tmp_path), SegmentWriter(tmp_path)
    one.open()
    two.open()
    try:
        assert one.active != two.active
        assert not one.reclaimable(two.active) and not two.reclaimable(one.active)
        assert not one.reclaimable(one.active)
    finally:
        two.close()
    assert one.reclaimable(two.active)  # its writer is gone
    one.close()


async def test_a_new_segment_is_never_seen_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling restart: the old writer reclaims while the new one starts a segment. The
    segment's name must appear already locked, or the old writer would take it (empty, no
    row names it) for garbage and unlink it under the new writer."""
    old = SegmentWriter(tmp_path)
    old.open()
    seen: list[bool] = []
    link = os.link

    def link_and_look(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        link(src, dst)
        seen.append(old.reclaimable(int(Path(dst).name.removesuffix(".seg"))))

    monkeypatch.setattr(os, "link", link_and_look)
    new_writer = SegmentWriter(tmp_path)
    new_writer.open()
    try:
        assert seen == [False]
        assert segment_seqs(tmp_path) == sorted([old.active, new_writer.active])
    finally:
        new_writer.close()
        old.close()


def test_an_old_staging_file_is_removed_at_start(tmp_path: Path) -> None:
    stale, fresh = tmp_path / "5.new", tmp_path / "6.new"
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    writer = SegmentWriter(tmp_path)
    writer.open()
    writer.close()
    assert not stale.exists() and fresh.exists()


async def test_a_missing_or_short_segment_is_a_clear_error(open_queue: Open) -> None:
    q = await open_queue()
    msgs = [new(data=body_of(100 * KB, i)) for i in range(2)]
    for m in msgs:
        assert await q.insert(m)
    [seq] = seg_files(q.queue_dir)
    path = segment_dir(db_path(q.queue_dir)) / f"{seq}.seg"
    os.truncate(path, 150 * KB)
    with pytest.raises(StoreError, match=f"{re.escape(str(path))}.* is short"):
        await q.body(msgs[1].id)
    path.unlink()
    with pytest.raises(StoreError, match=f"{re.escape(str(path))} is missing"):
        await q.body(msgs[0].id)


async def test_a_message_whose_segment_is_gone_is_held_and_the_rest_still_go(
    open_queue: Open,
) -> None:
    """One unreadable body must not stop the shard: it is the oldest due, so a failing
    claim would hit it every time and nothing behind it would be sent."""
    q = await open_queue()
    lost = new(data=body_of(100 * KB, 1))
    assert await q.insert(lost)
    [seq] = seg_files(q.queue_dir)
    assert q.spool.segments is not None
    q.spool.segments.rotate_at = 0  # the next body starts a new segment
    kept = new(data=body_of(100 * KB, 2))
    small = new(data=body_of(4 * KB, 3))
    assert await q.insert(kept) and await q.insert(small)
    (segment_dir(db_path(q.queue_dir)) / f"{seq}.seg").unlink()
    claimed = await claim(q, limit=10)
    assert sorted(i.id for i in claimed) == sorted([kept.id, small.id])
    [row] = await q.search(state=Status.HELD)
    assert row.id == lost.id and "is missing" in (row.last_error or "")


async def test_a_queue_written_before_segments_opens_and_delivers(open_queue: Open) -> None:
    """Blob bodies written by the previous layout (bodies without locator columns) read,
    move and delete as before; new large bodies beside them go to segments."""
    q = await open_queue()
    old = [new(data=body_of(100 * KB, i)) for i in range(3)]
    previous = queries.INLINE_MAX
    queries.INLINE_MAX = 1 << 40
    try:
        for m in old:
            assert await q.insert(m)
    finally:
        queries.INLINE_MAX = previous
    await q.close()
    with sqlite3.connect(db_path(q.queue_dir)) as conn:
        conn.execute("DROP INDEX bodies_seg")
        for column in ("seg", "off", "len"):
            conn.execute(f"ALTER TABLE bodies DROP COLUMN {column}")
        assert [r[1] for r in conn.execute("PRAGMA table_info(bodies)")] == ["id", "data"]

    q = await open_queue()
    fresh = new(data=body_of(100 * KB, 9))
    assert await q.insert(fresh)
    assert locators(q.queue_dir)[fresh.id][0] is not None
    assert await q.body(old[0].id) == old[0].data
    await q.delete(old[2].id, actor="test")
    items = {i.id: i for i in await claim(q)}
    assert {k: v.data for k, v in items.items()} == {m.id: m.data for m in (old[0], old[1], fresh)}
    for item in items.values():
        assert await q.record_round(item, now=time.time(), rounds=1, rnd=sent_round())
    assert locators(q.queue_dir) == {}


async def test_a_segment_write_error_refuses_the_message_and_stores_nothing(
    open_queue: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while appending: StoreError (the SMTP side answers 451), no row, and the
    queue takes the next body once the disk has room again."""
    q = await open_queue()

    def disk_full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", disk_full)
        with pytest.raises(StoreError, match=r"cannot write message body segment .*No space"):
            await q.insert(new(data=body_of(100 * KB, 1)))
    assert await q.counts() == {} and locators(q.queue_dir) == {}
    msg = new(data=body_of(100 * KB, 2))
    assert await q.insert(msg)
    [item] = await claim(q)
    assert item.data == msg.data
