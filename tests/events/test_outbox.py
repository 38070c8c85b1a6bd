"""Event webhooks out (relay.events.outbox): the sender against a real aiohttp receiver on
loopback that fails on command, with the real SQLite outbox underneath."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay.config import Duration, TokenSecret, WebhookConfig
from relay.events import outbox as outbox_module
from relay.events.model import MessageEvent
from relay.events.outbox import (
    IDLE_CAP,
    USER_AGENT,
    WebhookSender,
    event_body,
    iso_time,
    publish,
    sign,
    verify_signature,
)
from relay.queue.base import OutboxEntry, StoreError
from relay.queue.sqlite.outbox import SQLiteOutbox
from relay.queue.sqlite.shared import SharedDB

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z
SECRET = "whsec-0123456789abcdef"
WAIT = 10.0  # the longest any awaited event may take before the test fails


class Clock:
    """The injected clock: stands still unless the test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Arrival:
    event_id: str
    event: dict[str, Any]
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An application's webhook endpoint. The first requests follow `plan` ("500",
    "close": the connection dropped without an answer, "redirect", "hang": no answer until
    released); later ones, and every one when the plan is used up, answer 204."""

    plan: list[str] = field(default_factory=list)  # also "busy": 503 with Retry-After: 120
    accepted: list[Arrival] = field(default_factory=list)
    requests: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        action = self.plan.pop(0) if self.plan else "ok"
        async with self.changed:
            self.requests += 1
            if action == "ok":
                event = json.loads(body)
                self.accepted.append(Arrival(event["id"], event, dict(request.headers), body))
            self.changed.notify_all()
        if action == "500":
            return web.Response(status=500, text="the application is down")
        if action == "busy":
            return web.Response(status=503, headers={"Retry-After": "120"})
        if action == "redirect":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        if action == "close":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)
        if action == "hang":
            await self.release.wait()
        return web.Response(status=204)

    async def until(self, done: Callable[[], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(done), WAIT)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    state = Receiver()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/hook"
    yield state
    state.release.set()
    await runner.cleanup()


class WatchedOutbox(SQLiteOutbox):
    """The real SQLite outbox, telling the test each time an entry's outcome is written."""

    def __init__(self, shared: SharedDB) -> None:
        super().__init__(shared)
        self.outcomes: list[tuple[str, int, float | None, str | None]] = []
        self.changed = asyncio.Condition()

    async def _note(self, what: str, seq: int, at: float | None, error: str | None) -> None:
        async with self.changed:
            self.outcomes.append((what, seq, at, error))
            self.changed.notify_all()

    async def done(self, seq: int, *, owner: str) -> None:
        await super().done(seq, owner=owner)
        await self._note("done", seq, None, None)

    async def retry(self, seq: int, *, owner: str, next_attempt: float, error: str) -> None:
        await super().retry(seq, owner=owner, next_attempt=next_attempt, error=error)
        await self._note("retry", seq, next_attempt, error)

    async def give_up(self, seq: int, *, owner: str, error: str) -> None:
        await super().give_up(seq, owner=owner, error=error)
        await self._note("give_up", seq, None, error)

    def count(self, what: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome[0] == what)

    async def until(self, done: Callable[[], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(done), WAIT)


@pytest.fixture
def shared(tmp_path: Path) -> SharedDB:
    return SharedDB(tmp_path / "shared.db")


def hook(url: str, **overrides: Any) -> WebhookConfig:
    settings: dict[str, Any] = {"url": url, "secret": TokenSecret(SECRET), "name": "app"}
    settings.update(overrides)
    return WebhookConfig(**settings)


def event(msg: str, n: int, kind: str = "delivered", **extra: Any) -> MessageEvent:
    return MessageEvent(
        id=f"{msg}-{n}",
        event=kind,
        message_id=msg,
        at=T0 + n,
        recipient=f"rcpt-{n}@example.org",
        upstream="ses",
        **extra,
    )


class Senders:
    """Starts senders as background tasks and stops every one at the end."""

    def __init__(self) -> None:
        self.running: list[tuple[WebhookSender, asyncio.Task[None]]] = []

    def start(self, sender: WebhookSender) -> asyncio.Task[None]:
        task = asyncio.create_task(sender.run())
        self.running.append((sender, task))
        return task


@pytest.fixture
async def senders() -> AsyncIterator[Senders]:
    started = Senders()
    yield started
    for sender, _task in started.running:
        await sender.stop()


# -- the body and the signature ----------------------------------------------------------------


def test_event_body_is_compact_json_with_an_iso_utc_time() -> None:
    body = event_body(
        MessageEvent(
            id="ev1",
            event="bounced",
            message_id="m1",
            at=T0 + 0.1234,
            recipient="a@example.org",
            upstream="ses",
            reason="550 5.1.1 user unknown",
            detail={"bounce": "hard"},
        )
    )
    assert body == (
        b'{"id":"ev1","event":"bounced","message_id":"m1","recipient":"a@example.org",'
        b'"upstream":"ses","reason":"550 5.1.1 user unknown","at":"2024-05-01T12:00:00.123Z",'
        b'"detail":{"bounce":"hard"}}'
    )
    bare = json.loads(event_body(MessageEvent(id="e", event="sent", message_id="m", at=T0)))
    assert (bare["recipient"], bare["upstream"], bare["detail"]) == (None, None, None)
    assert iso_time(T0 + 86399.9999) == "2024-05-02T11:59:59.999Z"


def test_a_signature_verifies_only_with_its_secret_body_and_a_fresh_time() -> None:
    body = b'{"id":"e1"}'
    header = sign(SECRET, body, timestamp=int(T0))
    assert header.startswith(f"t={int(T0)},v1=")
    assert verify_signature(SECRET, header, body, now=T0 + 299)
    assert verify_signature(SECRET, header, body, now=T0 - 299)  # a receiver's clock behind
    assert not verify_signature("another-secret-value", header, body, now=T0)
    assert not verify_signature(SECRET, header, body + b" ", now=T0)
    assert not verify_signature(SECRET, header, body, now=T0 + 301)
    assert verify_signature(SECRET, header, body, now=T0 + 3000, max_age=3600)
    # A rotated secret: either value may match.
    _, mac = header.split(",v1=")
    assert verify_signature(SECRET, f"t={int(T0)},v1={'0' * 64},v1={mac}", body, now=T0)
    broken_headers = (
        "",
        "v1=" + mac,
        f"t={int(T0)}",
        f"t=soon,v1={mac}",
        f"t={int(T0)},v1=",
        f"t=\u00b2,v1={mac}",  # a digit to str.isdigit, not to int()
        f"t={int(T0)},v1=\u00e9{mac[1:]}",  # not ASCII
    )
    for broken in broken_headers:
        assert not verify_signature(SECRET, broken, body, now=T0)
    # The timestamp is signed: moving it breaks the signature.
    assert not verify_signature(SECRET, f"t={int(T0) + 1},v1={mac}", body, now=T0)


# -- publish ---------------------------------------------------------------------------------


async def test_publish_queues_each_event_for_each_subscribed_hook_once(shared: SharedDB) -> None:
    outbox = SQLiteOutbox(shared)
    hooks = (
        hook("http://127.0.0.1:9/all", name="all"),
        hook("http://127.0.0.1:9/bounces", name="bounces", events=("bounced", "complained")),
        hook("http://127.0.0.1:9/none", name="none", events=()),
    )
    events = [event("m1", 1, "sent"), event("m1", 2, "bounced"), event("m2", 1, "delivered")]
    assert await publish(outbox, hooks, events, now=T0) == 4
    # The same events again (a provider retrying its webhook) add nothing.
    assert await publish(outbox, hooks, events, now=T0 + 5) == 0
    assert await publish(outbox, hooks, [event("m3", 1, "delayed")], now=T0) == 0
    assert await outbox.pending() == {
        "all": {"waiting": 3, "dead": 0},
        "bounces": {"waiting": 1, "dead": 0},
    }
    claimed = await outbox.claim(now=T0, owner="o", lease_time=60, limit=10)
    bounce = next(e for e in claimed if e.hook == "bounces")
    assert (bounce.key, bounce.msg_id, bounce.body) == ("m1-2", "m1", event_body(events[1]))


# -- the sender ------------------------------------------------------------------------------


async def test_every_event_arrives_once_in_order_per_message_through_failures(
    receiver: Receiver, shared: SharedDB, senders: Senders
) -> None:
    """Three messages' events interleaved; the application fails the first six requests
    (500s, dropped connections, a redirect). Retries are immediate (schedule 0) so the test
    waits on arrivals, not on time."""
    receiver.plan = ["500", "close", "500", "redirect", "close", "500"]
    outbox = WatchedOutbox(shared)
    clock = Clock()
    sender = WebhookSender(
        outbox, (hook(receiver.url),), owner="a", clock=clock, concurrency=4, schedule=(0.0,)
    )
    senders.start(sender)
    events = [event(msg, n) for n in range(1, 5) for msg in ("m1", "m2", "m3")]
    assert await publish(outbox, (hook(receiver.url),), events, now=T0) == 12
    sender.wake()

    await receiver.until(lambda: len(receiver.accepted) == 12)
    await outbox.until(lambda: outbox.count("done") == 12)
    assert receiver.requests == 18
    assert Counter(a.event_id for a in receiver.accepted) == Counter(e.id for e in events)
    for msg in ("m1", "m2", "m3"):
        arrived = [a.event_id for a in receiver.accepted if a.event["message_id"] == msg]
        assert arrived == [f"{msg}-{n}" for n in range(1, 5)]
    assert await outbox.pending() == {}
    assert (sender.delivered, sender.failed_attempts, sender.dead) == (12, 6, 0)

    first = receiver.accepted[0]
    assert first.body == event_body(next(e for e in events if e.id == first.event_id))
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"] == USER_AGENT
    assert first.headers["X-Relay-Event"] == "delivered"
    assert first.headers["X-Relay-Event-Id"] == first.event_id
    for arrival in receiver.accepted:
        signature = arrival.headers["X-Relay-Signature"]
        assert verify_signature(SECRET, signature, arrival.body, now=T0)
        assert not verify_signature("not-the-secret-at-all", signature, arrival.body, now=T0)
    retried = {error for what, _, _, error in outbox.outcomes if what == "retry"}
    assert "HTTP 500: the application is down" in retried
    assert (
        "HTTP 307 redirect to /elsewhere (redirects are not followed: set the webhook's url"
        " to where it points)"
    ) in retried
    assert any(error and error.startswith("ServerDisconnectedError") for error in retried)


async def test_an_event_published_while_idle_goes_out_at_once(
    receiver: Receiver, shared: SharedDB, senders: Senders
) -> None:
    outbox = WatchedOutbox(shared)
    sender = WebhookSender(outbox, (hook(receiver.url),), owner="a", clock=Clock())
    senders.start(sender)
    await publish(outbox, (hook(receiver.url),), [event("m1", 1)], now=T0)
    sender.wake()
    # Well before the sender's own look at the outbox (IDLE_CAP): wake() did it.
    await asyncio.wait_for(receiver.until(lambda: len(receiver.accepted) == 1), IDLE_CAP / 2)


async def test_a_crashed_senders_events_are_sent_once_by_another_after_its_lease(
    receiver: Receiver, tmp_path: Path, senders: Senders
) -> None:
    """Sender A claims the message's first event and dies mid-POST (its tasks stop, it
    writes nothing). Sender B, another process on the same shared.db, takes the event over
    once A's lease has expired and delivers both events once, in order."""
    receiver.plan = ["hang"]
    clock = Clock()
    hooks = (hook(receiver.url),)
    crashed_outbox = SQLiteOutbox(SharedDB(tmp_path / "shared.db"))
    crashed = WebhookSender(crashed_outbox, hooks, owner="host:1:1", clock=clock, lease_time=60)
    crashed_run = senders.start(crashed)
    await publish(crashed_outbox, hooks, [event("m1", 1), event("m1", 2)], now=T0)
    crashed.wake()
    await receiver.until(lambda: receiver.requests == 1)
    crashed_run.cancel()  # dies: no stop(), no outcome written; its POST never answers

    outbox = WatchedOutbox(SharedDB(tmp_path / "shared.db"))
    survivor = WebhookSender(outbox, hooks, owner="host:2:1", clock=clock, lease_time=60)
    assert await outbox.claim(now=T0 + 59, owner="probe", lease_time=1, limit=10) == []
    clock.now = T0 + 61  # A's lease is over
    senders.start(survivor)
    survivor.wake()

    await receiver.until(lambda: len(receiver.accepted) == 2)
    await outbox.until(lambda: outbox.count("done") == 2)
    assert [a.event_id for a in receiver.accepted] == ["m1-1", "m1-2"]
    assert await outbox.pending() == {}
    assert receiver.requests == 3  # A's unanswered POST, then B's two


async def test_an_event_is_given_up_after_the_hooks_max_age_and_frees_its_message(
    receiver: Receiver, shared: SharedDB, senders: Senders, caplog: pytest.LogCaptureFixture
) -> None:
    """The default schedule: the first failure is retried 10 s (±10 %) later. Past max_age
    the next failure gives the event up (kept as dead), and the message's next event goes."""
    receiver.plan = ["500", "500"]
    outbox = WatchedOutbox(shared)
    clock = Clock()
    hooks = (hook(receiver.url, max_age=Duration(3600.0)),)
    sender = WebhookSender(outbox, hooks, owner="a", clock=clock)
    senders.start(sender)
    caplog.set_level(logging.INFO, logger="relay.events")
    await publish(outbox, hooks, [event("m1", 1), event("m1", 2)], now=T0)
    sender.wake()

    await outbox.until(lambda: outbox.count("retry") == 1)
    (_, _, next_attempt, error) = outbox.outcomes[0]
    assert next_attempt is not None and T0 + 9 <= next_attempt <= T0 + 11
    assert error == "HTTP 500: the application is down"

    clock.now = T0 + 3600
    sender.wake()
    await outbox.until(lambda: outbox.count("give_up") == 1)
    await receiver.until(lambda: len(receiver.accepted) == 1)
    await outbox.until(lambda: outbox.count("done") == 1)
    assert [a.event_id for a in receiver.accepted] == ["m1-2"]
    assert await outbox.pending() == {"app": {"waiting": 0, "dead": 1}}
    assert (sender.delivered, sender.failed_attempts, sender.dead) == (1, 2, 1)

    dead = [r for r in caplog.records if "is dead" in r.getMessage()]
    assert len(dead) == 1
    assert "gave up after 2 attempts over 1.0h (webhook max_age)" in dead[0].getMessage()
    # One warning for the hook's first failure, not one per retry; one line when it recovers.
    failing = [r for r in caplog.records if "retrying with backoff" in r.getMessage()]
    assert len(failing) == 1
    assert any("delivering again" in r.getMessage() for r in caplog.records)


async def test_the_last_retry_happens_at_max_age_not_a_full_delay_after(
    receiver: Receiver, shared: SharedDB, senders: Senders
) -> None:
    receiver.plan = ["500"]
    outbox = WatchedOutbox(shared)
    clock = Clock(T0 + 3590)  # 10 s before the event's max_age
    hooks = (hook(receiver.url, max_age=Duration(3600.0)),)
    sender = WebhookSender(outbox, hooks, owner="a", clock=clock, schedule=(600.0,))
    senders.start(sender)
    await publish(outbox, hooks, [event("m1", 1)], now=T0)
    sender.wake()
    await outbox.until(lambda: outbox.count("retry") == 1)
    assert outbox.outcomes[0][2] == T0 + 3600


async def test_events_of_a_hook_no_longer_configured_are_given_up(
    receiver: Receiver, shared: SharedDB, senders: Senders, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = WatchedOutbox(shared)
    old = hook("http://127.0.0.1:9/gone", name="old-crm")
    await publish(outbox, (old, hook(receiver.url)), [event("m1", 1)], now=T0)
    sender = WebhookSender(outbox, (hook(receiver.url),), owner="a", clock=Clock())
    senders.start(sender)
    await outbox.until(lambda: outbox.count("give_up") == 1 and outbox.count("done") == 1)
    (error,) = [e for what, _, _, e in outbox.outcomes if what == "give_up"]
    assert error == (
        "webhook 'old-crm' is no longer in the configuration ([[webhook]]); the event was not sent"
    )
    assert await outbox.pending() == {"old-crm": {"waiting": 0, "dead": 1}}
    assert [a.event_id for a in receiver.accepted] == ["m1-1"]


async def test_an_application_that_does_not_answer_in_time_is_retried(
    receiver: Receiver, shared: SharedDB, senders: Senders
) -> None:
    receiver.plan = ["hang"]
    outbox = WatchedOutbox(shared)
    hooks = (hook(receiver.url, timeout=Duration(0.2)),)
    sender = WebhookSender(outbox, hooks, owner="a", clock=Clock(), schedule=(0.0,))
    senders.start(sender)
    await publish(outbox, hooks, [event("m1", 1)], now=T0)
    sender.wake()
    await outbox.until(lambda: outbox.count("done") == 1)
    assert [o[3] for o in outbox.outcomes] == ["no answer within 0.2s", None]
    assert [a.event_id for a in receiver.accepted] == ["m1-1"]


async def test_a_retry_after_longer_than_the_schedule_is_honoured(
    receiver: Receiver, shared: SharedDB, senders: Senders
) -> None:
    receiver.plan = ["busy"]
    outbox = WatchedOutbox(shared)
    sender = WebhookSender(outbox, (hook(receiver.url),), owner="a", clock=Clock())
    senders.start(sender)
    await publish(outbox, (hook(receiver.url),), [event("m1", 1)], now=T0)
    sender.wake()
    await outbox.until(lambda: outbox.count("retry") == 1)
    assert outbox.outcomes[0][2:] == (T0 + 120, "HTTP 503")


class UnreachableOnce(WatchedOutbox):
    """The outbox's store fails its first claim (the database restarting)."""

    failed = False

    async def claim(
        self, *, now: float, owner: str, lease_time: float, limit: int
    ) -> list[OutboxEntry]:
        if not self.failed:
            self.failed = True
            raise StoreError("shared state (shared.db): disk I/O error")
        return await super().claim(now=now, owner=owner, lease_time=lease_time, limit=limit)


async def test_the_sender_outlives_a_store_that_fails_for_a_while(
    receiver: Receiver,
    shared: SharedDB,
    senders: Senders,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox_module, "STORE_PAUSE", 0.01)
    caplog.set_level(logging.INFO, logger="relay.events")
    outbox = UnreachableOnce(shared)
    await publish(outbox, (hook(receiver.url),), [event("m1", 1)], now=T0)
    sender = WebhookSender(outbox, (hook(receiver.url),), owner="a", clock=Clock())
    senders.start(sender)
    await outbox.until(lambda: outbox.count("done") == 1)
    assert outbox.failed
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.events"]
    assert messages == [
        "webhook outbox: cannot read the outbox: shared state (shared.db): disk I/O error"
        " (trying again)",
        "webhook outbox: the outbox can be read again",
    ]


async def test_stop_ends_a_sender_whose_run_has_not_started_yet(shared: SharedDB) -> None:
    """The application creates the run() task and may stop before the loop first runs it."""
    sender = WebhookSender(SQLiteOutbox(shared), (), owner="a", clock=Clock())
    task = asyncio.create_task(sender.run())
    await sender.stop()
    await asyncio.wait_for(task, WAIT)
