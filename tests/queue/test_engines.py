"""One suite, both engines: what `relay.queue.base.Queue` promises, checked against SQLite
and a real PostgreSQL, so the two stay equal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.message import Envelope, EventType, Kind, NewMessage, Status, new_message_id
from relay.queue.base import NO_UPSTREAM, Queue, QueueActionError, Round, UpstreamDelta
from relay.queue.postgres.engine import PostgresQueue
from relay.queue.sqlite.engine import SQLiteQueue
from tests.fakes.postgres import create_database

MakeQueue = Callable[..., Awaitable[Queue]]
NODE_A, NODE_B = "host-a:100:1", "host-b:200:1"


async def _make(engine: str, tmp_path: Path, postgres: str | None) -> AsyncIterator[MakeQueue]:
    opened: list[Queue] = []
    dsn = await create_database(postgres) if postgres else ""

    async def make(owner: str = NODE_A) -> Queue:
        queue: Queue
        if engine == "sqlite":
            queue = SQLiteQueue(tmp_path / "queue", owner=owner)
        else:
            queue = PostgresQueue(dsn, owner=owner, pool_size=3)
        await queue.start()
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        await queue.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeQueue]:
    postgres = request.getfixturevalue("postgres") if request.param == "postgres" else None
    async for make in _make(request.param, tmp_path, postgres):
        yield make


def new(
    *rcpts: str,
    data: bytes = b"Subject: x\r\n\r\nbody\r\n",
    dedupe: str | None = None,
    at: float | None = None,
) -> NewMessage:
    now = time.time() if at is None else at
    return NewMessage(
        id=new_message_id(now),
        kind=Kind.OUTBOUND,
        envelope=Envelope("app@example.com", rcpts or ("r@example.org",), crlf_only=True),
        data=data,
        received_at=now,
        received={"client": "127.0.0.1"},
        dedupe=dedupe,
    )


def sent_round(upstream: str = "outbox") -> Round:
    attempt = {"upstream": upstream, "outcome": "accepted", "provider_id": "p-1"}
    return Round(
        events=[(EventType.ATTEMPT, time.time(), attempt)],
        delivered=[{"upstream": upstream, "provider_id": "p-1"}],
        failed={},
        new_failures=False,
        retry=False,
        sent_detail={"deliveries": [{"upstream": upstream}]},
    )


def types(timeline: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in timeline]


async def claim(queue: Queue, limit: int = 10, lease: float = 60.0) -> list[Any]:
    return await queue.claim(Kind.OUTBOUND, now=time.time(), lease_time=lease, limit=limit)


async def test_insert_claim_and_send_keep_envelope_body_and_timeline(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg = new("a@example.org", "b@example.org", data=b"Subject: hi\r\n\r\n\x00\xff bytes\r\n")
    assert await q.insert(msg)
    [item] = await claim(q)
    assert item.id == msg.id and item.data == msg.data
    assert item.envelope.rcpt_tos == ("a@example.org", "b@example.org")
    assert item.envelope.crlf_only and item.envelope.queue_id == msg.id
    assert await claim(q) == []  # leased: nobody else gets it
    assert (await q.counts()) == {"sending": 1}
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=sent_round())
    row = await q.get(msg.id)
    assert row is not None and row.state == "sent" and row.attempts == 1
    assert await q.body(msg.id) is None  # a sent message's body is not kept
    timeline = await q.timeline(msg.id)
    assert types(timeline) == ["received", "attempt", "sent"]
    assert timeline[0]["client"] == "127.0.0.1" and timeline[1]["provider_id"] == "p-1"


async def test_dedupe_records_the_same_notification_once(make_queue: MakeQueue) -> None:
    q = await make_queue()
    assert await q.insert(new(dedupe="ses:abc"))
    assert not await q.insert(new(dedupe="ses:abc"))
    results = await asyncio.gather(*(q.insert(new(dedupe="ses:same")) for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    assert (await q.counts()) == {"queued": 2}


async def test_deferred_work_is_due_at_its_time_and_keeps_pending_recipients(
    make_queue: MakeQueue,
) -> None:
    q = await make_queue()
    msg = new("a@example.org", "b@example.org")
    await q.insert(msg)
    [item] = await claim(q)
    later = time.time() + 3600
    rnd = Round(
        events=[(EventType.ATTEMPT, time.time(), {"upstream": "x", "outcome": "transient"})],
        delivered=[{"upstream": "x", "recipients": ["a@example.org"]}],
        failed={},
        new_failures=False,
        retry=True,
        pending=("b@example.org",),
        next_attempt=later,
        reason="451 try later",
        defer_detail={"tried": ["x"]},
    )
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    assert await claim(q) == []
    assert await q.next_due(Kind.OUTBOUND) == pytest.approx(later)
    row = await q.get(msg.id)
    assert row is not None and row.state == "deferred" and row.rcpts == ["b@example.org"]
    assert row.last_error == "451 try later"
    assert types(await q.timeline(msg.id))[-2:] == ["note", "deferred"]
    flushed = await q.flush(now=time.time(), actor="test")
    assert flushed == [msg.id]
    [again] = await claim(q)
    assert again.envelope.rcpt_tos == ("b@example.org",) and again.attempts == 1


async def test_a_flush_for_an_upstream_back_takes_only_mail_that_waited_for_one(
    make_queue: MakeQueue,
) -> None:
    q = await make_queue()
    waiting, refused = new(), new()
    for msg in (waiting, refused):
        await q.insert(msg)
    later = time.time() + 3600
    for item in await claim(q):
        reason = (
            f"{NO_UPSTREAM}: x: breaker open until 12:00:00Z"
            if item.id == waiting.id
            else "x: 451 4.2.2 mailbox full"
        )
        rnd = Round(
            events=[],
            delivered=[],
            failed={},
            new_failures=False,
            retry=True,
            pending=item.envelope.rcpt_tos,
            next_attempt=later,
            reason=reason,
            defer_detail={"tried": []},
        )
        assert await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    assert await q.flush(now=time.time(), actor="routing", waiting_for_upstream=True) == [
        waiting.id
    ]
    assert [c.id for c in await claim(q)] == [waiting.id]
    assert types(await q.timeline(waiting.id))[-1] == "flushed"
    assert await q.flush(now=time.time(), actor="test") == [refused.id]  # the operator's: all


async def test_a_lost_lease_writes_nothing(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg = new()
    await q.insert(msg)
    [item] = await claim(q, lease=0.0)
    other = await make_queue(NODE_B)
    # The lease ran out (0 s): another host recovers it, though its owner looks alive.
    assert await other.recover(now=time.time(), alive=lambda owner: True) == [msg.id]
    [item_b] = await claim(other)
    # The first owner's late result must not overwrite the second owner's lease.
    assert not await q.record_round(item, now=time.time(), rounds=1, rnd=sent_round())
    row = await q.get(msg.id)
    assert row is not None and row.state == "sending"
    assert await other.record_round(item_b, now=time.time(), rounds=1, rnd=sent_round())
    assert types(await q.timeline(msg.id)) == ["received", "recovered", "attempt", "sent"]


async def test_recover_takes_expired_and_dead_leases_only(make_queue: MakeQueue) -> None:
    q = await make_queue()
    ids = [new().id for _ in range(3)]
    for i in ids:
        m = new()
        m.id = i
        await q.insert(m)
    items = await claim(q, lease=3600)
    assert len(items) == 3
    now = time.time()
    # Live owner, lease running: kept.
    assert await q.recover(now=now, alive=lambda owner: True) == []
    # The owner's process is gone: recovered at once, without waiting for the lease.
    assert sorted(await q.recover(now=now, alive=lambda owner: owner != NODE_A)) == sorted(ids)
    assert (await q.counts()) == {"queued": 3}
    assert all(["recovered" in types(await q.timeline(i)) for i in ids])


async def test_operator_actions_and_their_refusals(make_queue: MakeQueue) -> None:
    q = await make_queue()
    held, failed = new(), new("ok@example.org", "bad@example.org")
    await q.insert(held)
    await q.hold(held.id, now=time.time(), actor="cli:ops")
    with pytest.raises(QueueActionError, match="held"):
        await q.hold(held.id, now=time.time(), actor="cli:ops")
    assert (await q.get(held.id)).state == "held"  # type: ignore[union-attr]
    assert await claim(q) == []  # held work is not dispatched
    await q.release(held.id, now=time.time(), actor="cli:ops")
    with pytest.raises(QueueActionError, match="not held"):
        await q.release(held.id, now=time.time(), actor="cli:ops")
    [item] = await claim(q)
    with pytest.raises(QueueActionError, match="being delivered"):
        await q.delete(item.id, actor="cli:ops")
    await q.record_round(item, now=time.time(), rounds=1, rnd=sent_round())
    with pytest.raises(QueueActionError, match="already sent"):
        await q.retry(held.id, now=time.time(), actor="cli:ops")

    await q.insert(failed)
    [item] = await claim(q)
    rnd = Round(
        events=[],
        delivered=[{"upstream": "x", "recipients": ["ok@example.org"]}],
        failed={"bad@example.org": "550 no such user"},
        new_failures=True,
        retry=False,
        failure="1 of 2 recipients delivered; failed: bad@example.org: 550 no such user",
    )
    await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    assert [r.id for r in await q.search(state="failed")] == [failed.id]
    assert await q.retry_failed(now=time.time(), actor="cli:ops") == [failed.id]
    [again] = await claim(q)
    assert again.envelope.rcpt_tos == ("bad@example.org",)  # only the failed recipient
    assert "rcpts_failed" not in again.meta
    # Its arrival stays (queue-time figures stay true); max_age counts from the retry.
    assert again.created == pytest.approx(failed.received_at)
    assert again.window_start == pytest.approx(again.meta["retried_at"])
    assert again.window_start >= again.created
    await q.record_round(again, now=time.time(), rounds=2, rnd=sent_round())
    tl = types(await q.timeline(held.id))
    assert tl == ["received", "held", "released", "attempt", "sent"]
    await q.delete(failed.id, actor="cli:ops")
    assert await q.get(failed.id) is None and await q.timeline(failed.id) == []
    with pytest.raises(QueueActionError, match="no message"):
        await q.delete(failed.id, actor="cli:ops")


async def test_search_counts_and_history_purge(make_queue: MakeQueue) -> None:
    q = await make_queue()
    ten_days_ago = time.time() - 10 * 86400
    msgs = [new(at=ten_days_ago + i) for i in range(4)]
    for m in msgs:
        await q.insert(m)
    items = await claim(q, limit=2)
    for item in items:
        await q.record_round(item, now=ten_days_ago + 60, rounds=1, rnd=sent_round())
    assert (await q.counts()) == {"queued": 2, "sent": 2}
    assert [r.id for r in await q.search(limit=3)] == sorted(m.id for m in msgs)[:3]
    assert len(await q.search(state="queued", kind="outbound")) == 2
    assert await q.search(kind="inbound") == []
    assert await q.purge_history(state=Status.FAILED, older_than=time.time() - 86400) == 0
    assert await q.purge_history(state=Status.SENT, older_than=time.time() - 86400) == 2
    assert (await q.counts()) == {"queued": 2}


async def test_concurrent_inserts_are_all_durable(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msgs = [new(data=b"Subject: n\r\n\r\n" + bytes([i % 250]) * 5000) for i in range(60)]
    assert all(await asyncio.gather(*(q.insert(m) for m in msgs)))
    await q.close()
    reopened = await make_queue()  # what survives a restart is what was acknowledged
    got = {item.id: item.data for item in await claim(reopened, limit=100)}
    assert got == {m.id: m.data for m in msgs}


async def test_work_arriving_is_announced(make_queue: MakeQueue) -> None:
    q = await make_queue()
    woke = asyncio.Event()
    q.on_work(lambda kind: woke.set() if kind is Kind.OUTBOUND else None)
    await q.insert(new())
    await asyncio.wait_for(woke.wait(), 5)


async def test_routing_state_is_one_view_for_every_process(make_queue: MakeQueue) -> None:
    a, b = await make_queue(NODE_A), await make_queue(NODE_B)
    now = time.time()
    opened = UpstreamDelta("ses", attempts=3, failures=3, failure_run=3, last_error="503")
    opened.breaker = ("open", now, 10.0, now)
    await a.routing.sync([opened], now=now, half_life=60)
    seen = await b.routing.sync(
        [UpstreamDelta("ses", attempts=2, failures=2, failure_run=2)], now=now, half_life=60
    )
    row = seen["ses"]
    assert row.breaker == "open" and row.attempts == 5 and row.failures == 5
    assert row.consecutive_failures == 5 and row.last_error == "503"
    # An older transition does not undo a newer one.
    stale = UpstreamDelta("ses", breaker=("closed", 0.0, 10.0, now - 5))
    assert (await a.routing.sync([stale], now=now, half_life=60))["ses"].breaker == "open"
    closed = UpstreamDelta("ses", successes=1, attempts=1, reset_run=True)
    closed.breaker = ("closed", now, 10.0, now + 1)
    row = (await b.routing.sync([closed], now=now + 1, half_life=60))["ses"]
    assert row.breaker == "closed" and row.consecutive_failures == 0


async def test_rate_budget_is_shared(make_queue: MakeQueue) -> None:
    a, b = await make_queue(NODE_A), await make_queue(NODE_B)
    now = time.time()
    waits = [await (a if i % 2 else b).routing.take_token("sg", rate=5, now=now) for i in range(12)]
    assert waits.count(0.0) == 5  # one second's burst, whoever asks
    assert all(w > 0 for w in waits[5:])
    assert await a.routing.take_token("sg", rate=5, now=now + 1.0) == 0.0


@pytest.mark.parametrize("direction", ["sqlite-to-postgres", "postgres-to-sqlite"])
async def test_export_import_moves_every_state(
    direction: str, tmp_path: Path, postgres: str
) -> None:
    source_engine, target_engine = direction.split("-to-")
    async for make_source in _make(
        source_engine, tmp_path / "a", postgres if source_engine == "postgres" else None
    ):
        async for make_target in _make(
            target_engine, tmp_path / "b", postgres if target_engine == "postgres" else None
        ):
            src = await make_source()
            states = await fill_every_state(src)
            exported = [r async for r in src.export()]
            dst = await make_target()
            assert all([await dst.import_record(r) for r in exported])
            assert not await dst.import_record(exported[0])  # already there
            expected = {**states, "queued": states["queued"] + 1}
            del expected["sending"]  # a lease does not survive the move
            assert await dst.counts() == expected
            moved = {r["id"]: r for r in [r async for r in dst.export()]}
            for record in exported:
                got = moved[record["id"]]
                assert got["body"] == record["body"] and got["events"] == record["events"]
                assert got["meta"] == record["meta"] and got["rcpts"] == record["rcpts"]
                state = "queued" if record["state"] == "sending" else record["state"]
                assert got["state"] == state
            # Imported work is usable: the leased one is due again, dedupe still holds.
            assert len(await claim(dst, limit=100)) == states["queued"] + 1
            assert not await dst.insert(new(dedupe="ses:inbound-1"))


async def fill_every_state(q: Queue) -> dict[str, int]:
    """queued, sending, deferred, sent, failed and held, one each (2 queued)."""
    for _ in range(6):
        await q.insert(new("x@example.org"))
    await q.insert(new(dedupe="ses:inbound-1"))
    items = await claim(q, limit=4)
    sent, deferred, failed, _sending = items
    await q.record_round(sent, now=time.time(), rounds=1, rnd=sent_round())
    await q.record_round(
        deferred,
        now=time.time(),
        rounds=1,
        rnd=Round(
            events=[],
            delivered=[],
            failed={},
            new_failures=False,
            retry=True,
            pending=("x@example.org",),
            next_attempt=time.time() + 600,
            reason="later",
        ),
    )
    await q.record_round(
        failed,
        now=time.time(),
        rounds=1,
        rnd=Round(
            events=[],
            delivered=[],
            failed={"x@example.org": "550"},
            new_failures=True,
            retry=False,
            failure="x@example.org: 550",
        ),
    )
    [to_hold] = await q.search(state="queued", limit=1)
    await q.hold(to_hold.id, now=time.time(), actor="t")
    counts = await q.counts()
    assert counts == {"queued": 2, "sending": 1, "deferred": 1, "sent": 1, "failed": 1, "held": 1}
    return counts


def _open_routing(path: str, start_at: float) -> str:
    """One worker process opening the shared routing state at a given moment."""
    from relay.queue.sqlite.routing import SQLiteRouting

    while time.time() < start_at:
        pass
    store = SQLiteRouting(Path(path))
    try:
        store._db._connection()
        return "ok"
    except Exception as exc:
        return repr(exc)
    finally:
        store.close()


def test_workers_opening_the_shared_routing_state_together_all_succeed(tmp_path: Path) -> None:
    """Workers start at the same moment and each opens routing.db; setting WAL mode takes
    a lock SQLite does not wait for: one of them used to die with "database is locked"."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(8, mp_context=context) as pool:
        for round_ in range(15):
            path = str(tmp_path / f"routing-{round_}.db")
            start_at = time.time() + 0.2
            results = list(pool.map(_open_routing, [path] * 8, [start_at] * 8))
            assert results == ["ok"] * 8, results


async def test_postgres_commits_new_work_with_a_wal_flush(postgres: str) -> None:
    """250 means durable: the insert's transaction waits for the flush; the dispatcher's
    bookkeeping does not (losing its last instant in a database crash means an attempt is
    made again, never a loss)."""
    q = PostgresQueue(await create_database(postgres), owner=NODE_A)
    await q.start()
    try:
        show = "SHOW synchronous_commit"
        assert await q._durably(lambda c: c.fetchval(show)) == "on"
        assert await q._transaction(lambda c: c.fetchval(show), durable=True) == "on"
        assert await q._with_conn(lambda c: c.fetchval(show)) == "off"
        assert await q.insert(new())  # and the batcher goes through the durable path
        assert q._batcher is not None and q._batcher._run == q._durably
    finally:
        await q.close()
