"""What the operator surface reads from the queue, on both engines: the message search,
the meta a round leaves, idempotency keys, per-minute stats and in-flight counts."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from relay.message import (
    Envelope,
    EventType,
    Kind,
    NewMessage,
    first_id_at,
    new_message_id,
    subject_of,
)
from relay.queue.base import (
    IN_FLIGHT_TTL,
    MessageQuery,
    Queue,
    Round,
    StatPoint,
    UpstreamDelta,
)
from relay.queue.sqlite.engine import SQLiteQueue
from tests.queue.test_engines import NODE_A, NODE_B, MakeQueue, claim, sent_round


def message(
    *rcpts: str,
    sender: str = "app@example.com",
    subject: str = "Hello",
    at: float | None = None,
    kind: Kind = Kind.OUTBOUND,
    dedupe: str | None = None,
) -> NewMessage:
    at = time.time() if at is None else at
    data = f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    return NewMessage(
        id=new_message_id(at),
        kind=kind,
        envelope=Envelope(sender, rcpts or ("r@example.org",), crlf_only=True),
        data=data,
        received_at=at,
        received={"client": "127.0.0.1"},
        dedupe=dedupe,
    )


async def ids(queue: Queue, **filters: object) -> list[str]:
    return [r.id for r in await queue.find(MessageQuery(**filters))]  # type: ignore[arg-type]


# -- find ----------------------------------------------------------------------------------


async def test_pages_follow_the_cursor_newest_first_while_mail_arrives(
    make_queue: MakeQueue,
) -> None:
    q = await make_queue()
    start = time.time() - 100
    sent = [message(at=start + i) for i in range(7)]
    for m in sent:
        assert await q.insert(m)
    newest_first = [m.id for m in reversed(sent)]
    page1 = await ids(q, limit=3)
    assert page1 == newest_first[:3]
    for i in range(4):  # arrivals between two page loads
        await q.insert(message(at=time.time() + i))
    page2 = await ids(q, limit=3, before=page1[-1])
    page3 = await ids(q, limit=3, before=page2[-1])
    assert page1 + page2 + page3 == newest_first
    assert await ids(q, limit=3, before=page3[-1]) == []


async def test_each_filter_finds_exactly_its_messages(make_queue: MakeQueue) -> None:
    q = await make_queue()
    t0 = time.time() - 1000
    invoice = message("Ann@Shop.example", "bob@b.example", subject="Invoice 42", at=t0)
    welcome = message("carol@c.example", sender="news@lists.example", subject="Welcome", at=t0 + 10)
    inbound = message("dan@d.example", subject="Invoice copy", kind=Kind.INBOUND, at=t0 + 20)
    tricky = message("x_y@e.example", subject="50% off", at=t0 + 30)
    for m in (invoice, welcome, inbound, tricky):
        assert await q.insert(m)

    assert await ids(q, recipient="ann@shop") == [invoice.id]  # any recipient, any case
    assert await ids(q, recipient="BOB@") == [invoice.id]
    assert await ids(q, recipient="news@") == []  # the sender is not a recipient
    assert await ids(q, sender="NEWS@lists") == [welcome.id]
    assert await ids(q, sender="carol") == []  # a recipient is not the sender
    assert await ids(q, subject="invoice") == [invoice.id]  # inbound work has no subject
    assert await ids(q, subject="welcome") == [welcome.id]
    assert await ids(q, subject="bob") == []
    # LIKE's wildcards are plain characters in a search.
    assert await ids(q, subject="0%") == [tricky.id]
    assert await ids(q, recipient="x_y") == [tricky.id]
    assert await ids(q, recipient="xay") == []
    assert await ids(q, kind="inbound") == [inbound.id]
    assert await ids(q, kind="bounce") == []
    bounce = message("app@example.com", sender="", subject="Undelivered", at=t0 + 40)
    assert await q.insert(bounce)
    assert await ids(q, kind="bounce") == [bounce.id]  # outbound with the null sender
    assert bounce.id in await ids(q, kind="outbound")
    await q.delete(bounce.id, actor="test")
    assert await ids(q, since=t0 + 5, until=t0 + 25) == [inbound.id, welcome.id]
    assert await ids(q, sender="app@", recipient="bob", subject="42") == [invoice.id]

    [item] = [i for i in await claim(q) if i.id == welcome.id]
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=sent_round("mailgun"))
    assert await ids(q, state="sent") == [welcome.id]
    assert await ids(q, upstream="mailgun") == [welcome.id]
    assert await ids(q, upstream="mailgun", state="queued") == []
    assert await ids(q, state="queued") == [inbound.id]  # the others are leased now
    assert await ids(q, state="sending") == [tricky.id, invoice.id]


async def test_subject_is_decoded_and_searchable_in_any_case(make_queue: MakeQueue) -> None:
    q = await make_queue()
    m = message(subject="=?utf-8?q?R=C3=89SUM=C3=89?=\r\n =?utf-8?b?IGTDqXTDqQ==?=")
    assert await q.insert(m)
    row = await q.get(m.id)
    assert row is not None and row.meta["subject"] == "RÉSUMÉ dété"
    assert await ids(q, subject="résumé dé") == [m.id]


def test_subject_comes_from_the_header_section_only() -> None:
    assert subject_of(b"To: a\r\nsubject :  long\r\n\tline\r\n\r\nSubject: body") == "long\tline"
    assert subject_of(b"X-Subject: no\r\n\r\nSubject: in the body") is None
    assert subject_of(b"Subject: =?nope?q?x?=\r\n\r\n") == "=?nope?q?x?="  # kept as sent
    assert subject_of(b"Subject: " + b"x" * 500 + b"\r\n\r\n") == "x" * 200


async def test_shards_merge_newest_first_with_limit_and_cursor(tmp_path: Path) -> None:
    shards = [SQLiteQueue(tmp_path / "q", owner=f"h:{i}:1", shard=i, workers=2) for i in range(2)]
    for s in shards:
        await s.start()
    try:
        start = time.time() - 100
        sent = [message(at=start + i) for i in range(9)]
        for i, m in enumerate(sent):  # 0, 1, 2 to shard 0; 3, 4, 5 to shard 1; ...
            assert await shards[(i // 3) % 2].insert(m)
        newest_first = [m.id for m in reversed(sent)]
        reader = SQLiteQueue(tmp_path / "q", owner="cli:1:1")
        await reader.connect()
        page1 = await ids(reader, limit=4)
        page2 = await ids(reader, limit=4, before=page1[-1])
        page3 = await ids(reader, limit=4, before=page2[-1])
        assert page1 + page2 + page3 == newest_first
        assert await ids(reader, limit=2, recipient="r@") == newest_first[:2]
        assert await reader.oldest(states=("queued",)) == pytest.approx(start)
        await reader.close()
    finally:
        for s in shards:
            await s.close()


async def test_old_sqlite_queue_gets_its_search_text(tmp_path: Path) -> None:
    """A queue made before the search text existed is upgraded when opened."""
    import sqlite3

    from relay.queue.sqlite import store

    old_schema = re.sub(r",\n\s+look\s+TEXT[^\n]*", "", store.SCHEMA)
    assert "look" not in old_schema
    path = tmp_path / "q" / "queue.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(old_schema)
    conn.execute(
        "INSERT INTO messages (id, kind, state, mail_from, rcpts, size, created, updated,"
        " next_attempt, meta) VALUES ('01OLD', 'outbound', 'queued', 'Old@x.example', '[]',"
        ' 1, 1.0, 1.0, 1.0, \'{"rcpts_original": ["A@y.example"], "subject": "Hi"}\')'
    )
    conn.commit()
    conn.close()
    q = SQLiteQueue(tmp_path / "q", owner=NODE_A)
    await q.start()
    try:
        assert await ids(q, recipient="a@y") == ["01OLD"]
        assert await ids(q, sender="old@", subject="hi") == ["01OLD"]
    finally:
        await q.close()


# -- what rounds leave in meta ----------------------------------------------------------------


async def test_rounds_record_who_took_each_recipient(make_queue: MakeQueue) -> None:
    q = await make_queue()
    m = message("a@x.example", "b@x.example")
    assert await q.insert(m)
    [item] = await claim(q)
    t1 = time.time()
    partial = Round(
        events=[
            (
                EventType.ATTEMPT,
                t1,
                {"upstream": "ses", "outcome": "accepted", "provider_id": "s-1"},
            ),
            (
                EventType.ATTEMPT,
                t1 + 1,
                {"upstream": "sg", "outcome": "transient", "reason": "421"},
            ),
        ],
        delivered=[{"upstream": "ses", "provider_id": "s-1", "recipients": ["a@x.example"]}],
        failed={},
        new_failures=False,
        retry=True,
        pending=("b@x.example",),
        next_attempt=time.time(),
        reason="421",
    )
    assert await q.record_round(item, now=t1 + 2, rounds=1, rnd=partial)
    row = await q.get(m.id)
    assert row is not None and row.state == "deferred"
    assert row.meta["upstream"] == "sg" and row.meta["provider_id"] is None  # the last try
    assert row.meta["rcpts_done"] == {
        "a@x.example": {"upstream": "ses", "provider_id": "s-1", "at": t1}
    }
    assert row.meta["subject"] == "Hello" and row.meta["rcpts_original"] == list(
        m.envelope.rcpt_tos
    )

    [item] = await claim(q)
    t2 = time.time()
    rest = Round(
        events=[
            (
                EventType.ATTEMPT,
                t2,
                {"upstream": "mailgun", "outcome": "accepted", "provider_id": "m-9"},
            )
        ],
        delivered=[{"upstream": "mailgun", "provider_id": "m-9", "recipients": ["b@x.example"]}],
        failed={},
        new_failures=False,
        retry=False,
        sent_detail={},
    )
    assert await q.record_round(item, now=t2, rounds=2, rnd=rest)
    row = await q.get(m.id)
    assert row is not None and row.state == "sent"
    assert (row.meta["upstream"], row.meta["provider_id"]) == ("mailgun", "m-9")
    assert row.meta["rcpts_done"] == {
        "a@x.example": {"upstream": "ses", "provider_id": "s-1", "at": t1},
        "b@x.example": {"upstream": "mailgun", "provider_id": "m-9", "at": t2},
    }
    assert await ids(q, upstream="mailgun") == [m.id]


# -- oldest and idempotency keys -----------------------------------------------------------


async def test_oldest_is_the_earliest_arrival_in_the_states_asked(make_queue: MakeQueue) -> None:
    q = await make_queue()
    assert await q.oldest(states=("queued",)) is None
    t0 = time.time() - 500
    first, second = message(at=t0), message(at=t0 + 100)
    await q.insert(first)
    await q.insert(second)
    assert await q.oldest(states=("queued", "deferred")) == pytest.approx(t0)
    await q.hold(first.id, now=time.time(), actor="test")
    assert await q.oldest(states=("queued",)) == pytest.approx(t0 + 100)
    assert await q.oldest(states=("held",)) == pytest.approx(t0)
    assert await q.oldest(states=("failed",)) is None


async def test_an_idempotency_key_holds_for_a_day_then_is_free(make_queue: MakeQueue) -> None:
    q = await make_queue()
    day = 86_400.0
    old = message(at=time.time() - day - 60, dedupe="api:app:k1")
    assert await q.insert(old)
    now = time.time()
    assert await q.dedupe_owner("api:app:k1", since=now - 2 * day) == old.id  # within
    assert await q.dedupe_owner("api:app:k1", since=now - day) is None  # too old: let go
    fresh = message(dedupe="api:app:k1")
    assert await q.insert(fresh)  # the key can be used again
    assert await q.dedupe_owner("api:app:k1", since=now - day) == fresh.id
    assert not await q.insert(message(dedupe="api:app:k1"))
    assert await q.dedupe_owner("api:app:other", since=now - day) is None


async def test_concurrent_requests_with_one_key_store_one_message(make_queue: MakeQueue) -> None:
    a, b = await make_queue(NODE_A), await make_queue(NODE_B)
    tries = [message(dedupe="api:app:same") for _ in range(6)]
    results = await asyncio.gather(*((a, b)[i % 2].insert(m) for i, m in enumerate(tries)))
    assert sorted(results) == [False] * 5 + [True]
    winner = tries[results.index(True)].id
    # What the losers answer: the winner's id.
    owners = await asyncio.gather(
        *(q.dedupe_owner("api:app:same", since=time.time() - 60) for q in (a, b))
    )
    assert owners == [winner, winner]
    assert await a.counts() == {"queued": 1}


# -- per-minute stats ----------------------------------------------------------------------


async def test_stats_from_two_processes_add_up(make_queue: MakeQueue) -> None:
    a, b = await make_queue(NODE_A), await make_queue(NODE_B)
    minute = int(time.time() // 60)

    def points(n: int) -> list[StatPoint]:
        return [StatPoint(minute, "attempt", f"up{i % 5}", i % 10, 1.0) for i in range(n)]

    await asyncio.gather(*(s.stats.add(points(50)) for s in (a, b, a, b)))
    await a.stats.add([StatPoint(minute - 3, "received", "smtp", -1, 2.5)])
    cells = await b.stats.read(since=minute * 60 - 600, until=minute * 60 + 60)
    attempts = [c for c in cells if c.series == "attempt"]
    assert sum(c.value for c in attempts) == 200.0
    assert {c.value for c in attempts} == {20.0}  # 10 distinct cells, 4 adds of 5 each
    only = await b.stats.read(since=0, until=minute * 60 + 60, series=("received",))
    assert [(c.minute, c.label, c.bucket, c.value) for c in only] == [(minute - 3, "smtp", -1, 2.5)]
    # [since, until): the minute starting at `until` is not in it.
    assert await b.stats.read(since=0, until=(minute - 3) * 60, series=("received",)) == []
    assert await a.stats.purge(older_than=minute * 60) == 1
    assert await b.stats.read(since=0, until=minute * 60, series=()) == []


# -- in flight -----------------------------------------------------------------------------


async def test_in_flight_sums_live_processes_and_forgets_dead_ones(make_queue: MakeQueue) -> None:
    a, b = await make_queue(NODE_A), await make_queue(NODE_B)
    now = time.time()
    seed = UpstreamDelta("ses", attempts=1, successes=1)
    await a.routing.sync([seed], now=now, half_life=60, in_flight={"ses": 2})
    rows = await b.routing.sync([], now=now + 1, half_life=60, in_flight={"ses": 3})
    assert rows["ses"].in_flight == 5
    # A reader (the CLI, the web page) reports nothing and sees the sum.
    assert (await b.routing.sync([], now=now + 2, half_life=60))["ses"].in_flight == 5
    # a's count changes: it reports at once.
    await a.routing.sync([], now=now + 2, half_life=60, in_flight={"ses": 0})
    assert (await b.routing.sync([], now=now + 2, half_life=60))["ses"].in_flight == 3
    # b goes on reporting (unchanged counts: a heartbeat now and then); a died.
    later = now + 1
    while later < now + 1 + IN_FLIGHT_TTL + 1:
        later += 1.0
        rows = await b.routing.sync([], now=later, half_life=60, in_flight={"ses": 3})
        assert rows["ses"].in_flight == 3
    await a.routing.sync([], now=now + 3, half_life=60, in_flight={"ses": 4})
    assert (await b.routing.sync([], now=later, half_life=60))["ses"].in_flight == 7
    # Neither reports any more: within the TTL, nothing is left.
    assert (await b.routing.sync([], now=later + IN_FLIGHT_TTL + 1, half_life=60))[
        "ses"
    ].in_flight == 0


def test_every_id_of_a_moment_sorts_after_that_moments_first_id() -> None:
    """The purge walks (state, id) below first_id_at(T): an id of any earlier arrival
    must sort below it, and no id of an arrival at or after T."""
    t = 1_780_000_000.123
    ids = [new_message_id(t) for _ in range(100)]
    assert all(first_id_at(t) <= i < first_id_at(t + 0.002) for i in ids)
    assert max(new_message_id(t - 0.002) for _ in range(100)) < first_id_at(t)
