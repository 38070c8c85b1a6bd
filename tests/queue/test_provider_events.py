"""What the providers' events ask of the queue, on both engines: finding a message by its
upstream's id, recording each event once, requeueing a dropped recipient for another
upstream, keeping and then dropping a handed-over body, and the webhook replay guard."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from relay.message import EventType, Kind, Status
from relay.queue.base import (
    DeliveryRecord,
    Queue,
    QueueActionError,
    QueueBusy,
    Round,
    Suppression,
    SuppressionStore,
    WebhookOutbox,
)
from relay.queue.sqlite.engine import SQLiteQueue
from relay.queue.sqlite.store import db_path
from tests.queue.test_engines import NODE_A, NODE_B, MakeQueue, claim, new, types

SES_IDS = "0100018c-aaaa-0001,0100018c-bbbb-0002"
MAILGUN_ID = "<20240101.abc123@mg.example.com>"


def handed_over(
    upstream: str = "ses",
    provider_id: str | None = "p-1",
    *,
    keep_body: bool = False,
    recipients: list[str] | None = None,
) -> Round:
    """A round in which `upstream` took the whole message."""
    attempt = {"upstream": upstream, "outcome": "accepted", "provider_id": provider_id}
    delivered: dict[str, Any] = {"upstream": upstream, "provider_id": provider_id}
    if recipients is not None:
        delivered["recipients"] = recipients
    return Round(
        events=[(EventType.ATTEMPT, time.time(), attempt)],
        delivered=[delivered],
        failed={},
        new_failures=False,
        retry=False,
        sent_detail={"deliveries": [{"upstream": upstream}]},
        keep_body=keep_body,
    )


async def sent_message(
    q: Queue,
    *rcpts: str,
    upstream: str = "ses",
    provider_id: str | None = "p-1",
    keep_body: bool = True,
) -> str:
    msg = new(*rcpts)
    assert await q.insert(msg)
    [item] = await claim(q)
    rnd = handed_over(upstream, provider_id, keep_body=keep_body)
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    return msg.id


def record(
    msg_id: str,
    key: str,
    type_: EventType,
    status: str | None,
    *,
    rcpt: str = "r@example.org",
    upstream: str = "ses",
) -> DeliveryRecord:
    detail = {"recipient": rcpt, "upstream": upstream, "event": type_.value}
    return DeliveryRecord(key, msg_id, rcpt, type_, time.time(), detail, status)


async def status_of(q: Queue, msg_id: str, rcpt: str = "r@example.org") -> str:
    row = await q.get(msg_id)
    assert row is not None
    return str(row.meta["rcpts_status"][rcpt]["status"])


# -- the provider id index ----------------------------------------------------------------


async def test_a_message_is_found_by_each_form_of_its_upstreams_id(make_queue: MakeQueue) -> None:
    q = await make_queue()
    ses = await sent_message(q, provider_id=SES_IDS)
    mailgun = await sent_message(q, upstream="mailgun", provider_id=MAILGUN_ID)
    other = await sent_message(q, provider_id="p-other")
    assert await q.find_by_provider_id("0100018c-aaaa-0001") == ses
    assert await q.find_by_provider_id("0100018c-bbbb-0002") == ses
    assert await q.find_by_provider_id(SES_IDS) == ses
    # Mailgun's events name the id without the <> its send answer wraps it in.
    assert await q.find_by_provider_id("20240101.abc123@mg.example.com") == mailgun
    assert await q.find_by_provider_id(MAILGUN_ID) == mailgun
    assert await q.find_by_provider_id("p-other") == other
    assert await q.find_by_provider_id("p-unknown") is None
    assert await q.find_by_provider_id("") is None


async def test_each_hand_over_of_a_partial_round_is_indexed(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg = new("a@example.org", "b@example.org")
    await q.insert(msg)
    [item] = await claim(q)
    rnd = Round(
        events=[],
        delivered=[
            {"upstream": "sendgrid", "provider_id": "sg-1", "recipients": ["a@example.org"]},
            {"upstream": "mailgun", "provider_id": "<mg-1>", "recipients": ["b@example.org"]},
        ],
        failed={},
        new_failures=False,
        retry=False,
    )
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    assert await q.find_by_provider_id("sg-1") == msg.id
    assert await q.find_by_provider_id("mg-1") == msg.id


async def test_a_lost_lease_indexes_no_provider_id(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg = new()
    await q.insert(msg)
    [item] = await claim(q)
    await q.recover(now=time.time(), alive=lambda owner: False)
    rnd = handed_over(provider_id="late-1")
    assert not await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    assert await q.find_by_provider_id("late-1") is None


# -- recording provider events --------------------------------------------------------------


async def test_an_event_is_recorded_once_per_key(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg_id = await sent_message(q)
    rec = record(msg_id, "ses:evt-1", EventType.DELIVERED, "delivered")
    assert await q.record_delivery(rec)
    assert not await q.record_delivery(rec)
    # A provider's retries arriving together still add one event.
    again = record(msg_id, "ses:evt-2", EventType.PROCESSED, None)
    results = await asyncio.gather(*(q.record_delivery(again) for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    timeline = await q.timeline(msg_id)
    assert types(timeline) == ["received", "attempt", "sent", "delivered", "processed"]
    assert timeline[3]["recipient"] == "r@example.org" and timeline[3]["upstream"] == "ses"
    row = await q.get(msg_id)
    assert row is not None
    assert row.meta["rcpts_status"] == {
        "r@example.org": {"status": "delivered", "at": rec.at, "upstream": "ses"}
    }


async def test_a_bounce_outranks_a_delivery_whichever_comes_first(make_queue: MakeQueue) -> None:
    q = await make_queue()
    first = await sent_message(q, "a@example.org", "b@example.org")
    a, b = "a@example.org", "b@example.org"
    assert await q.record_delivery(record(first, "k1", EventType.DELIVERED, "delivered", rcpt=a))
    assert await q.record_delivery(record(first, "k2", EventType.BOUNCED, "bounced", rcpt=a))
    assert await q.record_delivery(record(first, "k3", EventType.BOUNCED, "bounced", rcpt=b))
    assert await q.record_delivery(record(first, "k4", EventType.DELIVERED, "delivered", rcpt=b))
    assert await status_of(q, first, a) == "bounced"
    assert await status_of(q, first, b) == "bounced"
    # Both late deliveries are still on the timeline: only the status keeps the bounce.
    assert types(await q.timeline(first))[-4:] == ["delivered", "bounced", "bounced", "delivered"]


async def test_an_event_for_a_message_waiting_for_others_is_recorded(
    make_queue: MakeQueue,
) -> None:
    q = await make_queue()
    msg = new("a@example.org", "b@example.org")
    await q.insert(msg)
    [item] = await claim(q)
    rnd = Round(
        events=[],
        delivered=[{"upstream": "ses", "provider_id": "p-a", "recipients": ["a@example.org"]}],
        failed={},
        new_failures=False,
        retry=True,
        pending=("b@example.org",),
        next_attempt=time.time() + 600,
        reason="451 later",
    )
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    rec = record(msg.id, "k", EventType.DELIVERED, "delivered", rcpt="a@example.org")
    assert await q.record_delivery(rec)
    row = await q.get(msg.id)
    assert row is not None and row.state == "deferred" and row.rcpts == ["b@example.org"]
    assert row.meta["rcpts_status"]["a@example.org"]["status"] == "delivered"


async def test_an_event_for_an_unknown_message_is_refused(make_queue: MakeQueue) -> None:
    q = await make_queue()
    with pytest.raises(QueueActionError, match="no message nope"):
        await q.record_delivery(record("nope", "k", EventType.DELIVERED, "delivered"))


# -- requeue after a provider-side drop -------------------------------------------------------


async def test_a_dropped_recipient_is_requeued_for_another_upstream(make_queue: MakeQueue) -> None:
    q = await make_queue()
    woken: list[Kind] = []
    q.on_work(woken.append)
    msg_id = await sent_message(q, "a@example.org", "b@example.org", upstream="sendgrid")
    body = await q.body(msg_id)
    assert body is not None  # kept at hand-over
    woken.clear()
    now = time.time()
    assert await q.requeue(
        msg_id,
        ["a@example.org"],
        exclude="sendgrid",
        now=now,
        reason="dropped: Bounced Address",
        key="sg:drop-1",
    )
    assert woken == [Kind.OUTBOUND]
    row = await q.get(msg_id)
    assert row is not None and row.state == "queued" and row.rcpts == ["a@example.org"]
    assert row.last_error == "dropped: Bounced Address"
    assert row.meta["excluded_upstreams"] == ["sendgrid"]
    assert row.meta["rcpts_status"]["a@example.org"]["status"] == "requeued"
    assert "a@example.org" not in (row.meta.get("rcpts_done") or {})
    last = (await q.timeline(msg_id))[-1]
    assert last["type"] == "requeued" and last["recipients"] == ["a@example.org"]
    assert last["upstream"] == "sendgrid" and last["reason"] == "dropped: Bounced Address"
    # The provider retries its webhook: nothing more happens.
    assert not await q.requeue(
        msg_id, ["a@example.org"], exclude="sendgrid", now=now, reason="again", key="sg:drop-1"
    )
    assert types(await q.timeline(msg_id)).count("requeued") == 1
    [item] = await claim(q)
    assert item.id == msg_id and item.data == body
    assert item.envelope.rcpt_tos == ("a@example.org",)
    assert item.meta["excluded_upstreams"] == ["sendgrid"]


async def test_a_second_drop_excludes_a_second_upstream_once(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg_id = await sent_message(q, upstream="sendgrid")
    for key, upstream in (("k1", "sendgrid"), ("k2", "sendgrid"), ("k3", "mailgun")):
        assert await q.requeue(
            msg_id, ["r@example.org"], exclude=upstream, now=time.time(), reason="x", key=key
        )
    row = await q.get(msg_id)
    assert row is not None and row.meta["excluded_upstreams"] == ["sendgrid", "mailgun"]
    assert row.rcpts == ["r@example.org"]


async def test_a_requeue_adds_to_the_recipients_still_waiting(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg = new("a@example.org", "b@example.org")
    await q.insert(msg)
    [item] = await claim(q)
    later = time.time() + 3600
    rnd = Round(
        events=[],
        delivered=[{"upstream": "ses", "provider_id": "p-a", "recipients": ["a@example.org"]}],
        failed={},
        new_failures=False,
        retry=True,
        pending=("b@example.org",),
        next_attempt=later,
        reason="451 later",
    )
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    now = time.time()
    assert await q.requeue(
        msg.id, ["a@example.org"], exclude="ses", now=now, reason="rejected", key="k"
    )
    row = await q.get(msg.id)
    assert row is not None and row.state == "queued"
    assert row.rcpts == ["b@example.org", "a@example.org"]
    assert row.next_attempt == pytest.approx(now)
    assert "a@example.org" not in (row.meta.get("rcpts_done") or {})
    assert row.meta["rcpts_status"]["a@example.org"]["status"] == "requeued"


async def test_a_held_message_stays_held_when_requeued(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg = new("a@example.org", "b@example.org")
    await q.insert(msg)
    await q.hold(msg.id, now=time.time(), actor="cli:ops")
    assert await q.requeue(
        msg.id, ["c@example.org"], exclude="ses", now=time.time(), reason="x", key="k"
    )
    row = await q.get(msg.id)
    assert row is not None and row.state == "held"
    assert row.rcpts == ["a@example.org", "b@example.org", "c@example.org"]
    assert await claim(q) == []


async def test_a_requeue_is_refused_while_leased_and_without_a_body(make_queue: MakeQueue) -> None:
    q = await make_queue()
    args: dict[str, Any] = {"exclude": "ses", "reason": "dropped", "now": time.time()}
    gone = await sent_message(q, keep_body=False)
    assert await q.body(gone) is None
    with pytest.raises(QueueActionError, match="body is no longer kept"):
        await q.requeue(gone, ["r@example.org"], key="k-gone", **args)
    row = await q.get(gone)
    assert row is not None and row.state == "sent"
    assert "requeued" not in types(await q.timeline(gone))
    with pytest.raises(QueueActionError, match="no message nope"):
        await q.requeue("nope", ["r@example.org"], key="k-no", **args)

    msg = new()
    await q.insert(msg)
    [item] = await claim(q)
    with pytest.raises(QueueBusy, match="being delivered right now"):
        await q.requeue(msg.id, ["r@example.org"], key="k-busy", **args)
    # Refused means nothing written, the key included: asked again later, it applies.
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=handed_over(keep_body=True))
    assert await q.requeue(msg.id, ["r@example.org"], key="k-busy", **args)


# -- kept bodies ------------------------------------------------------------------------------


async def test_kept_bodies_are_dropped_once_old_and_only_those(make_queue: MakeQueue) -> None:
    q = await make_queue()
    kept = await sent_message(q, keep_body=True)
    assert await q.body(kept) is not None
    # A sent message is not the operator's to retry, body or not.
    with pytest.raises(QueueActionError, match="already sent"):
        await q.retry(kept, now=time.time(), actor="cli:ops")
    waiting = new()
    await q.insert(waiting)
    held = new()
    await q.insert(held)
    await q.hold(held.id, now=time.time(), actor="cli:ops")
    assert await q.drop_bodies(sent_before=time.time() - 3600) == 0
    assert await q.body(kept) is not None
    assert await q.drop_bodies(sent_before=time.time() + 1) == 1
    assert await q.body(kept) is None
    assert await q.body(waiting.id) is not None and await q.body(held.id) is not None
    assert await q.drop_bodies(sent_before=time.time() + 1) == 0


async def test_a_failed_message_keeps_its_body_through_drop_bodies(make_queue: MakeQueue) -> None:
    q = await make_queue()
    msg = new()
    await q.insert(msg)
    [item] = await claim(q)
    rnd = Round(
        events=[],
        delivered=[],
        failed={"r@example.org": "550 no"},
        new_failures=True,
        retry=False,
        failure="550 no",
    )
    assert await q.record_round(item, now=time.time(), rounds=1, rnd=rnd)
    assert await q.drop_bodies(sent_before=time.time() + 1) == 0
    assert await q.body(msg.id) == msg.data


# -- forgetting -------------------------------------------------------------------------------


async def test_purge_and_delete_forget_provider_ids_and_event_keys(make_queue: MakeQueue) -> None:
    q = await make_queue()
    purged = await sent_message(q, provider_id="p-purged")
    deleted = await sent_message(q, provider_id="p-deleted")
    assert await q.record_delivery(record(purged, "k-p", EventType.DELIVERED, "delivered"))
    assert await q.record_delivery(record(deleted, "k-d", EventType.DELIVERED, "delivered"))
    await q.delete(deleted, actor="cli:ops")
    assert await q.find_by_provider_id("p-deleted") is None
    assert await q.purge_history(state=Status.SENT, older_than=time.time() + 1) == 1
    assert await q.find_by_provider_id("p-purged") is None
    # The keys went with their messages: a message that reuses one records it afresh.
    again = await sent_message(q, provider_id="p-purged")
    assert await q.find_by_provider_id("p-purged") == again
    assert await q.record_delivery(record(again, "k-p", EventType.DELIVERED, "delivered"))


# -- the replay guard ---------------------------------------------------------------------------


async def test_a_nonce_is_new_once_on_every_process_until_it_expires(
    make_queue: MakeQueue,
) -> None:
    q1, q2 = await make_queue(NODE_A), await make_queue(NODE_B)
    now = time.time()
    assert await q1.first_use("mailgun:tok-1", now=now, expires=now + 60)
    assert not await q1.first_use("mailgun:tok-1", now=now, expires=now + 60)
    assert not await q2.first_use("mailgun:tok-1", now=now + 30, expires=now + 90)
    assert await q2.first_use("mailgun:tok-2", now=now, expires=now + 60)
    # Once expired, the key is forgotten (and its row swept by a later use).
    assert await q2.first_use("mailgun:tok-1", now=now + 61, expires=now + 121)
    assert not await q1.first_use("mailgun:tok-1", now=now + 62, expires=now + 122)
    results = await asyncio.gather(
        *(q.first_use("mailgun:tok-3", now=now, expires=now + 60) for q in (q1, q2, q1, q2))
    )
    assert sorted(results) == [False, False, False, True]
    # A key given back (its request's events could not be recorded) is taken again.
    await q2.forget_use("mailgun:tok-3")
    assert await q1.first_use("mailgun:tok-3", now=now, expires=now + 60)


# -- SQLite: events for a message in another worker's shard ------------------------------------


async def test_sqlite_events_reach_a_message_in_another_workers_shard(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    worker1 = SQLiteQueue(queue_dir, owner=NODE_B, shard=1, workers=2)
    worker0 = SQLiteQueue(queue_dir, owner=NODE_A, shard=0, workers=2)
    await worker1.start()
    await worker0.start()
    try:
        msg_id = await sent_message(worker1, upstream="sendgrid", provider_id="sg-9")
        assert db_path(queue_dir, 1).exists()
        assert await worker0.find_by_provider_id("sg-9") == msg_id
        rec = record(msg_id, "sg:evt-9", EventType.DROPPED, "dropped", upstream="sendgrid")
        assert await worker0.record_delivery(rec)
        assert not await worker0.record_delivery(rec)
        assert await worker0.requeue(
            msg_id, ["r@example.org"], exclude="sendgrid", now=time.time(), reason="x", key="rq"
        )
        assert await claim(worker0) == []  # not its shard's work
        [item] = await claim(worker1)
        assert item.id == msg_id and item.meta["excluded_upstreams"] == ["sendgrid"]
    finally:
        await worker0.close()
        await worker1.close()


async def test_the_suppression_list_and_outbox_live_with_the_queue(make_queue: MakeQueue) -> None:
    q1, q2 = await make_queue(NODE_A), await make_queue(NODE_B)
    assert isinstance(q1.suppressions, SuppressionStore) and q1.suppressions is q1.suppressions
    assert isinstance(q1.outbox, WebhookOutbox) and q1.outbox is q1.outbox
    entry = Suppression("bounced@example.org", "", "hard_bounce", "ses:evt-1", time.time())
    assert await q1.suppressions.add([entry]) == 1
    # Another process (or host) of the same queue reads the same list.
    [seen] = await q2.suppressions.list()
    assert seen.address == "bounced@example.org" and seen.reason == "hard_bounce"
    assert await q1.outbox.add([("app", "k1", "m1", b"{}")], now=time.time()) == 1
    assert (await q2.outbox.pending())["app"]["waiting"] == 1
