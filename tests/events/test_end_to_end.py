"""Provider events end to end: a relay on loopback, fake providers that check requests as
the real APIs do, and webhooks posted over HTTP exactly as SendGrid signs them."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.app import Relay
from relay.config import WebhookConfig
from relay.events.outbox import verify_signature
from relay.message import EventType
from relay.queue.base import MessageQuery, StoreError
from relay.web.context import WebContext
from relay.web.views import upstream_rows
from tests.conftest import RelayFactory, mailgun_upstream, relay_config, wait_states
from tests.fakes.providers import FAKE_KEY, FakeMailgun, FakeSendGrid
from tests.web.conftest import base_url


def relay_config_webhook(relay: Relay, hook: dict[str, Any]) -> tuple[WebhookConfig, ...]:
    """A [[webhook]] entry as the config file would give it (secrets resolved)."""
    return relay_config(relay.config.base_dir, webhook=[hook]).webhook


def web_context(relay: Relay) -> WebContext:
    return WebContext(
        config=relay.config,
        queue=relay.queue,
        submit=relay.submit,
        readiness=relay.readiness_problems,
    )


SENDER, RCPT = "app@example.com", "alice@example.org"


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def events_key(signing_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch) -> str:
    """The verification key as SendGrid's settings page shows it (base64 DER)."""
    der = signing_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    monkeypatch.setenv("SG_EVENTS_KEY", base64.b64encode(der).decode())
    return "env:SG_EVENTS_KEY"


@pytest.fixture
async def sendgrid() -> AsyncIterator[FakeSendGrid]:
    fake = FakeSendGrid()
    await fake.start()
    yield fake
    await fake.stop()


def sendgrid_entry(fake: FakeSendGrid, key: str) -> dict[str, Any]:
    return {
        "name": "sendgrid",
        "type": "sendgrid",
        "api_key": FAKE_KEY,
        "base_url": fake.url,
        "priority": 1,
        "timeout": "5s",
        "events": True,
        "webhook": {"public_key": key},
    }


async def post_sendgrid(
    relay: Relay, key: ec.EllipticCurvePrivateKey, events: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    return await post_upstream(relay, "sendgrid", key, events)


async def post_upstream(
    relay: Relay, name: str, key: ec.EllipticCurvePrivateKey, events: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    """POST events signed as SendGrid's Signed Event Webhook does (ECDSA P-256 over the
    timestamp followed by the raw body) to upstream `name`'s endpoint."""
    body = json.dumps(events).encode()
    stamp = str(int(time.time()))
    signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    headers = {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base_url(relay)}/webhooks/{name}", data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def sendgrid_event(relay_id: str, provider_id: str, event: str, **fields: Any) -> dict[str, Any]:
    """One event as SendGrid posts it: custom_args (our relay_id) flattened in."""
    return {
        "email": RCPT,
        "timestamp": int(time.time()),
        "event": event,
        "sg_event_id": f"ev-{event}-{relay_id}",
        "sg_message_id": f"{provider_id}.filterdrecv-5645d9c87f-6r2ch-1-5F1A0C8D-1.0",
        "relay_id": relay_id,
        **fields,
    }


async def send(relay: Relay, to: str = RCPT, sender: str = SENDER) -> None:
    await aiosmtplib.send(
        f"From: {sender}\r\nTo: {to}\r\nSubject: events\r\n\r\nhello\r\n",
        sender=sender,
        recipients=[to],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )


async def handed_to_sendgrid(relay: Relay, fake: FakeSendGrid) -> tuple[str, str]:
    """(our message id, SendGrid's X-Message-Id) of the one message sent."""
    await wait_states(relay, sent=1)
    (row,) = await relay.queue.search(state="sent")
    (recorded,) = fake.requests
    assert recorded.body["custom_args"] == {"relay_id": row.id}
    return row.id, recorded.provider_id


async def test_a_message_sendgrid_dropped_for_its_own_reason_goes_out_through_mailgun_once(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    mailgun: FakeMailgun,
    signing_key: ec.EllipticCurvePrivateKey,
    events_key: str,
) -> None:
    relay = await make_relay(
        upstream=[sendgrid_entry(sendgrid, events_key), mailgun_upstream(mailgun, priority=2)]
    )
    await send(relay)
    msg_id, provider_id = await handed_to_sendgrid(relay, sendgrid)
    assert await relay.queue.body(msg_id) is not None  # kept: SendGrid may still drop it

    dropped = sendgrid_event(
        msg_id, provider_id, "dropped", reason="Recipient List over Package Quota"
    )
    status, answer = await post_sendgrid(relay, signing_key, [dropped])
    assert (status, answer["requeued"], answer["recorded"]) == (200, 1, 1)
    await relay.wait_for(lambda: _async(len(mailgun.requests) == 1))
    await wait_states(relay, sent=1)

    # SendGrid retries the webhook: nothing more happens.
    status, answer = await post_sendgrid(relay, signing_key, [dropped])
    assert (status, answer["duplicates"], answer["requeued"]) == (200, 1, 0)
    await wait_states(relay, sent=1)
    assert len(mailgun.requests) == 1 and len(sendgrid.requests) == 1

    timeline = await relay.queue.timeline(msg_id)
    types = [e["type"] for e in timeline]
    assert types.count(EventType.DROPPED) == 1 and types.count(EventType.REQUEUED) == 1
    attempts = [e["upstream"] for e in timeline if e["type"] == EventType.ATTEMPT]
    assert attempts == ["sendgrid", "mailgun"]
    requeued = next(e for e in timeline if e["type"] == EventType.REQUEUED)
    assert requeued["upstream"] == "sendgrid" and "Package Quota" in requeued["reason"]
    row = await relay.queue.get(msg_id)
    assert row is not None and row.meta["excluded_upstreams"] == ["sendgrid"]
    assert row.meta["upstream"] == "mailgun"

    # A drop by the last upstream left is not re-sent there again: it fails for good.
    assert relay.events is not None


async def test_a_hard_bounce_reports_to_the_sender_and_the_address_is_refused_next_time(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    mailgun: FakeMailgun,
    signing_key: ec.EllipticCurvePrivateKey,
    events_key: str,
) -> None:
    relay = await make_relay(
        upstream=[sendgrid_entry(sendgrid, events_key), mailgun_upstream(mailgun, priority=2)],
        retry={"bounces": True},
    )
    await send(relay)
    msg_id, provider_id = await handed_to_sendgrid(relay, sendgrid)
    bounce = sendgrid_event(
        msg_id,
        provider_id,
        "bounce",
        type="bounce",
        status="5.1.1",
        reason="550 5.1.1 The email account that you tried to reach does not exist",
    )
    status, answer = await post_sendgrid(relay, signing_key, [bounce])
    assert (status, answer["recorded"]) == (200, 1)

    # The report goes to the sender, once, even when SendGrid repeats the event.
    await wait_states(relay, sent=2)
    status, answer = await post_sendgrid(relay, signing_key, [bounce])
    assert (status, answer["duplicates"]) == (200, 1)
    await wait_states(relay, sent=2)
    (report,) = await relay.queue.find(MessageQuery(kind="bounce"))
    assert report.meta["rcpts_original"] == [SENDER]
    assert report.meta["subject"] == "Undelivered Mail Returned to Sender"
    assert len(sendgrid.requests) + len(mailgun.requests) == 2

    row = await relay.queue.get(msg_id)
    assert row is not None and row.meta["rcpts_status"][RCPT]["status"] == "bounced"
    timeline = await relay.queue.timeline(msg_id)
    assert [e["type"] for e in timeline].count(EventType.BOUNCED) == 1
    assert [e["type"] for e in timeline].count(EventType.DSN) == 1

    # The upstream table counts the bounce, and the rate providers suspend accounts on.
    await relay.telemetry.rollup.flush()
    (sendgrid_row,) = [
        u for u in await upstream_rows(web_context(relay)) if u["name"] == "sendgrid"
    ]
    last_hour = sendgrid_row["events"]["1h"]
    assert (last_hour["hard_bounce"], last_hour["accepted"]) == (1, len(sendgrid.requests))
    assert last_hour["bounce_rate"] == round(1 / len(sendgrid.requests), 5)

    # The address is suppressed: the next message to it is refused at RCPT TO.
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(relay)
    (reply,) = refused.value.recipients
    assert reply.code == 550 and "suppress" in reply.message.lower()
    assert len(sendgrid.requests) + len(mailgun.requests) == 2


async def test_an_event_for_an_unknown_message_is_acknowledged_and_counted(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    signing_key: ec.EllipticCurvePrivateKey,
    events_key: str,
) -> None:
    relay = await make_relay(upstream=[sendgrid_entry(sendgrid, events_key)])
    event = sendgrid_event("01ABCDEFGHJKMNPQRSTV", "nosuchid", "delivered")
    status, answer = await post_sendgrid(relay, signing_key, [event])
    assert (status, answer["unmatched"], answer["recorded"]) == (200, 1, 0)


async def test_a_forged_webhook_changes_nothing(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    events_key: str,
) -> None:
    relay = await make_relay(upstream=[sendgrid_entry(sendgrid, events_key)])
    await send(relay)
    msg_id, provider_id = await handed_to_sendgrid(relay, sendgrid)
    forger = ec.generate_private_key(ec.SECP256R1())
    event = sendgrid_event(msg_id, provider_id, "bounce", type="bounce", reason="550 no")
    status, answer = await post_sendgrid(relay, forger, [event])
    assert status == 401 and answer["error"] == "unauthenticated"
    timeline = await relay.queue.timeline(msg_id)
    assert EventType.BOUNCED not in [e["type"] for e in timeline]
    assert relay.suppression is None or relay.suppression.check(RCPT, SENDER) is None


async def test_webhooks_of_an_upstream_without_events_are_not_found(
    make_relay: RelayFactory, sendgrid: FakeSendGrid, tmp_path: Path
) -> None:
    entry = {**sendgrid_entry(sendgrid, "env:UNUSED"), "events": False, "webhook": {}}
    relay = await make_relay(upstream=[entry])
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base_url(relay)}/webhooks/sendgrid", data=b"[]") as resp,
    ):
        assert resp.status == 404


async def _async(value: bool) -> bool:
    return value


class AppReceiver:
    """An application's webhook endpoint on loopback: records each POST, signals arrivals."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []  # (X-Relay-Signature, body)
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append((request.headers.get("X-Relay-Signature", ""), await request.read()))
        self.arrived.set()
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/relay", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hooks/relay"

    async def wait_for(self, n: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(30):
            while len(self.posts) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return [json.loads(body) for _, body in self.posts]


async def test_the_app_hears_sent_then_delivered_signed_in_order(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    signing_key: ec.EllipticCurvePrivateKey,
    events_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APP_HOOK_SECRET", "whsec-0123456789abcdef")
    receiver = AppReceiver()
    await receiver.start()
    try:
        relay = await make_relay(
            upstream=[sendgrid_entry(sendgrid, events_key)],
            webhook=[{"url": receiver.url, "secret": "env:APP_HOOK_SECRET", "name": "app"}],
        )
        await send(relay)
        msg_id, provider_id = await handed_to_sendgrid(relay, sendgrid)
        delivered = sendgrid_event(msg_id, provider_id, "delivered", response="250 OK")
        assert (await post_sendgrid(relay, signing_key, [delivered]))[0] == 200
        assert (await post_sendgrid(relay, signing_key, [delivered]))[0] == 200  # a retry
        first, second = await receiver.wait_for(2)
    finally:
        if receiver.runner is not None:
            await receiver.runner.cleanup()
    assert (first["event"], first["message_id"], first["recipient"]) == ("sent", msg_id, RCPT)
    assert first["upstream"] == "sendgrid"
    assert (second["event"], second["message_id"], second["upstream"]) == (
        "delivered",
        msg_id,
        "sendgrid",
    )
    for header, body in receiver.posts:
        assert verify_signature("whsec-0123456789abcdef", header, body, now=time.time())
        assert not verify_signature("another-secret-000000", header, body, now=time.time())
    assert len(receiver.posts) == 2  # the repeated event was not posted again
    await relay.telemetry.rollup.flush()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base_url(relay)}/metrics") as resp,
    ):
        scraped = await resp.text()
    assert 'relay_webhook_events{hook="app",state="dead"} 0.0' in scraped
    assert 'relay_webhook_events{hook="app",state="waiting"}' in scraped
    assert 'relay_provider_events_total{event="delivered",upstream="sendgrid"} 1.0' in scraped


async def test_each_upstream_gets_a_dropped_recipient_once_then_the_sender_hears(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    signing_key: ec.EllipticCurvePrivateKey,
    events_key: str,
) -> None:
    first = {**sendgrid_entry(sendgrid, events_key), "name": "sg-a"}
    second = {**sendgrid_entry(sendgrid, events_key), "name": "sg-b", "priority": 2}
    relay = await make_relay(upstream=[first, second], retry={"bounces": True})
    await send(relay)
    await wait_states(relay, sent=1)
    (row,) = await relay.queue.search(state="sent")
    for n, name in enumerate(("sg-a", "sg-b"), start=1):
        await relay.wait_for(lambda n=n: _async(len(sendgrid.requests) >= n))
        await wait_states(relay, sent=1)
        dropped = sendgrid_event(
            row.id,
            sendgrid.requests[n - 1].provider_id,
            "dropped",
            reason="Recipient List over Package Quota",
        )
        dropped["sg_event_id"] = f"drop-{name}"
        status, answer = await post_upstream(relay, name, signing_key, [dropped])
        assert (status, answer["requeued"]) == (200, 1 if name == "sg-a" else 0)
    # Both dropped it: the sender gets a report instead of a third try.
    await wait_states(relay, sent=2)
    (report,) = await relay.queue.find(MessageQuery(kind="bounce"))
    assert report.meta["rcpts_original"] == [SENDER]
    attempts = [e["upstream"] for e in await relay.queue.timeline(row.id) if e["type"] == "attempt"]
    assert attempts == ["sg-a", "sg-b"]
    assert len(sendgrid.requests) == 3  # the message to each, then the report


async def test_a_message_every_upstream_dropped_fails_at_dispatch_instead_of_waiting(
    make_relay: RelayFactory, sendgrid: FakeSendGrid, events_key: str
) -> None:
    relay = await make_relay(upstream=[sendgrid_entry(sendgrid, events_key)])
    await send(relay)
    msg_id, _ = await handed_to_sendgrid(relay, sendgrid)
    # As an operator's tooling (or an older relay) might: requeued with nowhere left to go.
    assert await relay.queue.requeue(
        msg_id, [RCPT], exclude="sendgrid", now=time.time(), reason="dropped", key="k1"
    )
    await wait_states(relay, failed=1)
    row = await relay.queue.get(msg_id)
    assert row is not None and "dropped by every upstream (sendgrid)" in (row.last_error or "")
    assert len(sendgrid.requests) == 1


async def test_a_mailgun_request_the_queue_could_not_record_is_taken_when_mailgun_retries_it(
    make_relay: RelayFactory, mailgun: FakeMailgun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mailgun retries a request that got no 200 as it was signed (same token): the token
    the failed attempt took is given back, so the retry is taken, and only then is the
    token spent (a third copy is a replay)."""
    monkeypatch.setenv("MG_SIGNING_KEY", "key-3ax6xnjp29jd6fds4gc373sgvjxteol0")
    entry = mailgun_upstream(mailgun, events=True, webhook={"signing_key": "env:MG_SIGNING_KEY"})
    relay = await make_relay(upstream=[entry])
    await send(relay)
    await wait_states(relay, sent=1)
    (row,) = await relay.queue.search(state="sent")
    stamp, token = str(int(time.time())), "b7e1c1d1e9f979f3de0a8ce0edb2dd8301dee6c2405235584e"
    signature = hmac.new(
        b"key-3ax6xnjp29jd6fds4gc373sgvjxteol0", (stamp + token).encode(), "sha256"
    )
    body = json.dumps(
        {
            "signature": {"timestamp": stamp, "token": token, "signature": signature.hexdigest()},
            "event-data": {
                "id": "Ase7i2zsRYeDXztHGENqRA",
                "event": "delivered",
                "timestamp": time.time(),
                "recipient": RCPT,
                "message": {"headers": {"message-id": "20240501.1@mg.example.com"}},
                "user-variables": {"relay_id": row.id},
                "delivery-status": {"code": 250, "message": "OK"},
            },
        }
    ).encode()

    real = relay.queue.record_delivery
    failing = {"left": 1}

    async def record_once_failing(rec: Any) -> bool:
        if failing["left"]:
            failing["left"] -= 1
            raise StoreError("queue write failed: disk I/O error")
        return await real(rec)

    monkeypatch.setattr(relay.queue, "record_delivery", record_once_failing)
    url = f"{base_url(relay)}/webhooks/mailgun"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
        async with http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["recorded"] == 1
        async with http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 401 and "replayed" in (await resp.json())["message"]
    timeline = await relay.queue.timeline(row.id)
    assert [e["type"] for e in timeline].count(EventType.DELIVERED) == 1


async def test_a_batch_of_events_for_several_messages_is_recorded_in_order_per_message(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    signing_key: ec.EllipticCurvePrivateKey,
    events_key: str,
) -> None:
    relay = await make_relay(upstream=[sendgrid_entry(sendgrid, events_key)])
    for n in range(3):
        await send(relay, to=f"user{n}@example.org")
    await wait_states(relay, sent=3)
    rows = await relay.queue.search(state="sent")
    batch = []
    for row, recorded in zip(rows, sendgrid.requests, strict=True):
        rcpt = row.meta["rcpts_original"][0]
        for name in ("processed", "deferred", "delivered"):
            event = sendgrid_event(row.id, recorded.provider_id, name, email=rcpt)
            event["sg_event_id"] = f"{name}-{row.id}"
            batch.append(event)
    status, answer = await post_sendgrid(relay, signing_key, batch)
    assert (status, answer["recorded"]) == (200, 9)
    for row in rows:
        timeline = await relay.queue.timeline(row.id)
        provider = [
            e["type"] for e in timeline if e["type"] in ("processed", "delayed", "delivered")
        ]
        assert provider == ["processed", "delayed", "delivered"]
        current = await relay.queue.get(row.id)
        assert current is not None
        assert current.meta["rcpts_status"][row.meta["rcpts_original"][0]]["status"] == "delivered"


async def test_a_reload_turns_events_on_rotates_the_signing_key_and_adds_an_app_webhook(
    make_relay: RelayFactory,
    sendgrid: FakeSendGrid,
    signing_key: ec.EllipticCurvePrivateKey,
    events_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = {**sendgrid_entry(sendgrid, events_key), "events": False, "webhook": {}}
    relay = await make_relay(upstream=[entry])
    await send(relay)
    msg_id, provider_id = await handed_to_sendgrid(relay, sendgrid)
    event = sendgrid_event(msg_id, provider_id, "delivered")
    assert (await post_sendgrid(relay, signing_key, [event]))[0] == 404

    # Events on, and an application's webhook added: no restart.
    receiver = AppReceiver()
    await receiver.start()
    monkeypatch.setenv("APP_HOOK_SECRET", "whsec-0123456789abcdef")
    hook = {"url": receiver.url, "secret": "env:APP_HOOK_SECRET", "name": "app"}
    on = dataclasses.replace(
        relay.config,
        upstream=(
            dataclasses.replace(
                relay.config.upstream[0], events=True, webhook={"public_key": events_key}
            ),
        ),
        webhook=relay_config_webhook(relay, hook),
    )
    try:
        result = await relay.reload(on)
        assert result.ok and not result.needs_restart, result
        status, answer = await post_sendgrid(relay, signing_key, [event])
        assert (status, answer["recorded"]) == (200, 1)
        (posted,) = await receiver.wait_for(1)
        assert (posted["event"], posted["message_id"]) == ("delivered", msg_id)
    finally:
        if receiver.runner is not None:
            await receiver.runner.cleanup()

    # A new verification key (SendGrid's was regenerated): the old one's signatures fail.
    new_key = ec.generate_private_key(ec.SECP256R1())
    der = new_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    monkeypatch.setenv("SG_EVENTS_KEY_2", base64.b64encode(der).decode())
    rotated = dataclasses.replace(
        relay.config,
        upstream=(
            dataclasses.replace(
                relay.config.upstream[0], webhook={"public_key": "env:SG_EVENTS_KEY_2"}
            ),
        ),
    )
    assert (await relay.reload(rotated)).ok
    later = {**event, "event": "deferred", "sg_event_id": "ev-later"}
    assert (await post_sendgrid(relay, signing_key, [later]))[0] == 401
    assert (await post_sendgrid(relay, new_key, [later]))[0] == 200
