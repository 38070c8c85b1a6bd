"""Failover scenarios end to end: SMTP in, the relay's routing, fake providers out.

Each test sends real SMTP to an in-process relay whose upstreams are fake provider servers
on loopback that check requests like the real APIs and fail on command.
"""

from __future__ import annotations

import base64
import email
import email.policy
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import dkim
import pytest

from relay.app import Relay
from relay.dkim import generate_key
from relay.queue.admin import QueueAdmin
from relay.queue.base import NO_UPSTREAM, Queue, UpstreamShare
from tests.conftest import RelayFactory, mailgun_upstream, make_message, wait_states
from tests.fakes.providers import FAKE_KEY, FakeMailgun, FakeProvider, FakeSendGrid
from tests.upstreams.conftest import RICH

FAST = {
    "routing": {"cooldown": "0.05s", "failures_to_open": 2},
    "retry": {"schedule": ["1h"], "max_age": "1d", "bounces": False},
}


@pytest.fixture
async def sendgrid() -> AsyncIterator[FakeSendGrid]:
    fake = FakeSendGrid()
    await fake.start()
    yield fake
    await fake.stop()


def sendgrid_upstream(fake: FakeProvider, **extra: Any) -> dict[str, Any]:
    return {
        "name": "sendgrid",
        "type": "sendgrid",
        "api_key": FAKE_KEY,
        "base_url": fake.url,
        "priority": 2,
        "timeout": "5s",
        **extra,
    }


async def send(
    relay: Relay, data: bytes, rcpts: list[str] | None = None, sender: str = "app@example.com"
) -> None:
    await aiosmtplib.send(
        data,
        sender=sender,
        recipients=rcpts or ["rcpt@example.org"],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )


async def timelines(relay: Relay) -> list[list[dict[str, Any]]]:
    rows = await relay.queue.search()
    return [await relay.queue.timeline(r.id) for r in rows]


async def test_failover_when_primary_returns_503(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[mailgun_upstream(mailgun), sendgrid_upstream(sendgrid)], **FAST
    )
    mailgun.fail(503, times=1)
    await send(relay, make_message())
    await wait_states(relay, sent=1)
    [events] = await timelines(relay)
    attempts = [e for e in events if e["type"] == "attempt"]
    assert [(a["upstream"], a["outcome"]) for a in attempts] == [
        ("mailgun", "transient"),
        ("sendgrid", "accepted"),
    ]
    assert "503" in attempts[0]["reason"]
    # Delivered in the same round: no deferral in between.
    assert "deferred" not in [e["type"] for e in events]
    assert len(sendgrid.requests) == 1 and not mailgun.requests


async def test_failover_when_primary_throttles_and_load_comes_back(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[mailgun_upstream(mailgun), sendgrid_upstream(sendgrid)], **FAST
    )
    mailgun.fail(429, times=None, headers={"Retry-After": "1"})
    for i in range(4):
        await send(relay, make_message(subject=f"during {i}"))
    await wait_states(relay, sent=4)
    assert len(sendgrid.requests) == 4 and not mailgun.requests
    state = relay.router.state("mailgun")
    assert state.breaker.value == "open"

    mailgun.reset()
    relay.router.state("mailgun").opened_at -= 1.0  # the cool-down has passed
    for i in range(3):
        await send(relay, make_message(subject=f"after {i}"))
    await wait_states(relay, sent=7)
    # The probe succeeded: the primary takes the load again.
    assert len(mailgun.requests) == 3
    assert relay.router.state("mailgun").breaker.value == "closed"


async def test_all_upstreams_down_defers_then_delivers_everything_once(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[mailgun_upstream(mailgun), sendgrid_upstream(sendgrid)], **FAST
    )
    mailgun.fail(500, times=None)
    sendgrid.fail(503, times=None)
    for i in range(6):
        await send(relay, make_message(subject=f"m{i}"))
    await wait_states(relay, deferred=6)
    rows = await relay.queue.search()
    assert all(r.last_error for r in rows)

    mailgun.reset()
    sendgrid.reset()
    for name in ("mailgun", "sendgrid"):
        relay.router.state(name).opened_at -= 1.0
    await relay.queue.flush(now=time.time(), actor="test")
    assert relay.outbound is not None
    relay.outbound.wake()
    await wait_states(relay, sent=6)
    subjects = sorted(
        [
            email.message_from_bytes(r.body["message"][0]).get("Subject", "")
            for r in mailgun.requests
        ]
        + [r.body["subject"] for r in sendgrid.requests]
    )
    assert subjects == [f"m{i}" for i in range(6)]  # each exactly once


async def test_permanent_400_is_not_retried_and_bounces(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[mailgun_upstream(mailgun), sendgrid_upstream(sendgrid)],
        routing=FAST["routing"],
        retry={"bounces": True},
    )
    mailgun.fail(400, times=1, message="'to' parameter is not a valid address")
    await send(relay, make_message(), sender="app@example.com")
    # The failed message, plus its bounce delivered to the sender.
    await wait_states(relay, failed=1, sent=1)
    rows = {r.state: r for r in await relay.queue.search()}
    failed, bounce = rows["failed"], rows["sent"]
    assert failed.attempts == 1 and "not a valid address" in (failed.last_error or "")
    assert bounce.mail_from == "" and bounce.meta["rcpts_original"] == ["app@example.com"]
    events = await relay.queue.timeline(failed.id)
    assert [e["type"] for e in events] == ["received", "attempt", "failed", "dsn"]
    # The bounce went out through routing (mailgun, raw MIME) as a delivery report.
    report = email.message_from_bytes(mailgun.requests[0].body["message"][0])
    assert report.get_content_type() == "multipart/report"
    assert "not a valid address" in report.as_string()
    assert not sendgrid.requests


async def test_bcc_recipients_are_delivered(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(upstream=[mailgun_upstream(mailgun)], **FAST)
    await send(
        relay, make_message(to="to@example.org"), rcpts=["to@example.org", "hidden@example.net"]
    )
    await wait_states(relay, sent=1)
    assert mailgun.requests[0].body["to"] == ["to@example.org", "hidden@example.net"]


async def test_sendgrid_gets_attachments_and_non_ascii_headers(
    make_relay: RelayFactory, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(upstream=[sendgrid_upstream(sendgrid, priority=1)], **FAST)
    await send(
        relay, RICH, sender="juergen@example.com", rcpts=["anna@example.net", "bcc@example.org"]
    )
    await wait_states(relay, sent=1)
    body = sendgrid.requests[0].body
    assert body["subject"] == "Überweisung für März"
    assert body["from"] == {"email": "juergen@example.com", "name": "Jürgen Müller"}
    [personalization] = body["personalizations"]
    assert personalization["to"] == [{"email": "anna@example.net", "name": "Anna Schön"}]
    assert personalization["bcc"] == [{"email": "bcc@example.org"}]
    names = {a["filename"]: a for a in body["attachments"]}
    assert names["Rechnung März.pdf"]["type"] == "application/pdf"
    assert names["Rechnung März.pdf"]["disposition"] == "attachment"
    inline = [a for a in body["attachments"] if a.get("disposition") == "inline"]
    assert inline and inline[0]["content_id"] == "logo@example.com"
    assert body["custom_args"]["relay_id"]


async def test_signed_message_is_routed_only_to_raw_mime_upstreams(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid, priority=1), mailgun_upstream(mailgun, priority=2)],
        **FAST,
    )
    signed = (
        b"From: <app@example.com>\r\nTo: <rcpt@example.org>\r\nSubject: s\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; boundary=b; "
        b'protocol="application/pkcs7-signature"\r\n\r\n--b\r\n\r\nhi\r\n--b--\r\n'
    )
    await send(relay, signed)
    await wait_states(relay, sent=1)
    assert not sendgrid.requests and len(mailgun.requests) == 1
    assert relay.router.state("sendgrid").failures == 0  # skipped, not failed


async def test_dkim_signature_verifies_after_the_handoff(
    make_relay: RelayFactory, mailgun: FakeMailgun, tmp_path: Path
) -> None:
    pem, record = generate_key("example.com", "relay1", tmp_path / "dkim")
    relay = await make_relay(
        upstream=[mailgun_upstream(mailgun)],
        dkim=[{"domain": "example.com", "selector": "relay1", "private_key": f"file:{pem}"}],
        **FAST,
    )
    await send(relay, make_message(sender="app@example.com"))
    await wait_states(relay, sent=1)
    handed_over: bytes = mailgun.requests[0].body["message"][0]
    assert handed_over.startswith(b"DKIM-Signature:")
    txt = "".join(record.split('"')[1::2]).encode()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"relay1._domainkey.example.com."
        return txt

    assert dkim.verify(handed_over, dnsfunc=dns)


async def test_ambiguous_timeout_is_recorded_and_fails_over(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[mailgun_upstream(mailgun, timeout="0.3s"), sendgrid_upstream(sendgrid)], **FAST
    )
    mailgun.hang(times=1)
    await send(relay, make_message())
    await wait_states(relay, sent=1)
    [events] = await timelines(relay)
    first = next(e for e in events if e["type"] == "attempt")
    assert first["upstream"] == "mailgun" and first.get("ambiguous") is True
    assert relay.router.state("mailgun").ambiguous == 1
    assert len(sendgrid.requests) == 1


def _parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.default)


async def test_unverified_sender_fails_over_and_the_provider_stays_up_for_others(
    make_relay: RelayFactory, mailgun: FakeMailgun, sendgrid: FakeSendGrid
) -> None:
    """A provider refusing one sender's identity is that sender's problem there: the
    messages go out through the next upstream, and no breaker opens for everyone else."""
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid, priority=1), mailgun_upstream(mailgun, priority=2)],
        **FAST,
    )
    sendgrid.fail(
        403,
        times=4,
        message="The from address does not match a verified Sender Identity.",
    )
    for i in range(4):
        await send(relay, make_message(subject=f"unverified {i}"))
    await wait_states(relay, sent=4)
    assert len(mailgun.requests) == 4 and not sendgrid.requests
    assert relay.router.state("sendgrid").breaker.value == "closed"

    for i in range(2):
        await send(relay, make_message(subject=f"verified {i}"))
    await wait_states(relay, sent=6)
    assert len(sendgrid.requests) == 2


async def test_one_stray_500_does_not_stop_the_only_provider(
    make_relay: RelayFactory, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid)],
        routing={"failures_to_open": 5, "cooldown": "1h"},
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": False},
    )
    sendgrid.fail(500, times=1)
    await send(relay, make_message(subject="unlucky"))
    await wait_states(relay, deferred=1)
    # Before: the 500 opened the breaker for the whole cooldown, and this one waited too.
    await send(relay, make_message(subject="next"))
    await wait_states(relay, deferred=1, sent=1)
    assert relay.router.state("sendgrid").breaker.value == "closed"
    assert relay.router.state("sendgrid").consecutive_failures == 0


async def test_operator_flush_probes_an_open_breaker_and_deferrals_name_the_real_error(
    make_relay: RelayFactory, sendgrid: FakeSendGrid, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.dispatch")
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid)],
        routing={"failures_to_open": 5, "cooldown": "1h"},
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": False},
    )
    sendgrid.fail(401, times=None)  # a bad key: the breaker opens at once, for an hour
    await send(relay, make_message(subject="first"))
    await wait_states(relay, deferred=1)
    await send(relay, make_message(subject="while open"))
    await wait_states(relay, deferred=2)
    second = (await relay.queue.search())[1]
    # Not "no upstream is available" alone: which upstream, why, and its last real error.
    assert second.last_error is not None
    assert "sendgrid: breaker open until" in second.last_error
    assert "last error: HTTP 401" in second.last_error

    sendgrid.reset()  # the operator fixed the key
    ids, probing = await QueueAdmin(relay.queue).flush(actor="test")
    assert len(ids) == 2 and probing == ["sendgrid"]
    await wait_states(relay, sent=2)  # not deferred again for the rest of the hour
    assert relay.router.state("sendgrid").breaker.value == "closed"
    # Every transition is logged with the upstream and its cause.
    said = [r.getMessage() for r in caplog.records if "breaker" in r.getMessage()]
    assert any("sendgrid breaker open for 3600s: upstream-wide error: HTTP 401" in s for s in said)
    assert any("sendgrid breaker half-open" in s for s in said)
    assert any("sendgrid breaker closed: an attempt succeeded" in s for s in said)


async def test_mail_that_found_every_breaker_open_goes_when_the_probe_succeeds(
    make_relay: RelayFactory, sendgrid: FakeSendGrid
) -> None:
    """Not at its next step of the retry schedule (an hour here): one waiting message
    carries the probe, and the probe's success makes the others due."""
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid)],
        routing={"failures_to_open": 5, "cooldown": "4s"},
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": False},
    )
    sendgrid.fail(401, times=None)  # upstream-wide: the breaker opens at once, for 4 s
    await send(relay, make_message(subject="tried"))
    await wait_states(relay, deferred=1)
    for n in range(1, 3):
        await send(relay, make_message(subject=f"found the breaker open {n}"))
        await wait_states(relay, deferred=1 + n)
    carrier, *waiting = await relay.queue.search()
    share = relay.router.state("sendgrid")
    # The upstream's fault, not the message's: it waits for the upstream, and carries the
    # probe; its reason names the upstream's real error.
    assert carrier.next_attempt == pytest.approx(share.opened_at + share.cooldown, abs=0.001)
    assert carrier.last_error is not None and carrier.last_error.startswith(NO_UPSTREAM)
    assert "last error: HTTP 401" in carrier.last_error
    for row in waiting:  # no wake-up at every probe
        assert row.next_attempt > time.time() + 3000
        assert row.last_error is not None and row.last_error.startswith(NO_UPSTREAM)
    sendgrid.reset()  # the provider is back before the probe
    await wait_states(relay, sent=3)
    for row in waiting:
        flushed = [e for e in await relay.queue.timeline(row.id) if e["type"] == "flushed"]
        assert [e["by"] for e in flushed] == ["routing (sendgrid back)"]


async def test_mail_held_back_by_a_pause_goes_when_the_operator_resumes(
    make_relay: RelayFactory, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid)],
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": False},
    )
    admin = QueueAdmin(relay.queue, routing_changed=relay.router.refresh)
    await admin.upstream_action("sendgrid", "pause", actor="ops", cooldown=0)
    await send(relay, make_message())
    await wait_states(relay, deferred=1)
    [row] = await relay.queue.search()
    assert row.last_error == f"{NO_UPSTREAM}: sendgrid: paused by an operator"
    await admin.upstream_action("sendgrid", "resume", actor="ops", cooldown=0)
    await wait_states(relay, sent=1)  # not in an hour


class BreakerAtFlush:
    """The queue, noting the shared breaker row at the moment `flush` makes messages due."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.seen: UpstreamShare | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    async def flush(self, *, now: float, actor: str) -> list[str]:
        rows = await self.queue.routing.sync([], now=now, half_life=60.0)
        self.seen = rows["sendgrid"]
        return await self.queue.flush(now=now, actor=actor)


async def test_a_flush_asks_the_probe_before_it_makes_messages_due(
    make_relay: RelayFactory, sendgrid: FakeSendGrid
) -> None:
    """Otherwise a dispatcher may take a flushed message while the breaker is still open
    and defer it for another cooldown (seen in CI: one of two flushed messages stayed)."""
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid)],
        routing={"failures_to_open": 5, "cooldown": "1h"},
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": False},
    )
    sendgrid.fail(401, times=None)
    await send(relay, make_message())
    await wait_states(relay, deferred=1)
    sendgrid.reset()
    watching = BreakerAtFlush(relay.queue)
    await QueueAdmin(cast(Queue, watching)).flush(actor="test")
    assert watching.seen is not None and watching.seen.breaker == "open"
    assert watching.seen.opened_at + watching.seen.cooldown <= time.time()  # due to probe
    await wait_states(relay, sent=1)


async def test_a_bounce_reaches_the_sender_through_a_json_only_provider(
    make_relay: RelayFactory, sendgrid: FakeSendGrid
) -> None:
    relay = await make_relay(
        upstream=[sendgrid_upstream(sendgrid)],
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": True},
    )
    sendgrid.fail(400, times=1, message="The to array is invalid")  # this message's fault
    await send(relay, make_message(subject="doomed"), sender="app@example.com")
    await wait_states(relay, failed=1, sent=1)
    [dsn] = sendgrid.requests
    body = dsn.body
    assert body["subject"] == "Undelivered Mail Returned to Sender"
    assert [p["email"] for p in body["personalizations"][0]["to"]] == ["app@example.com"]
    text = next(c["value"] for c in body["content"] if c["type"] == "text/plain")
    assert "rcpt@example.org" in text and "The to array is invalid" in text
    names = {a["filename"]: a for a in body["attachments"]}
    status = base64.b64decode(names["delivery-status.txt"]["content"])
    assert b"Final-Recipient: rfc822; rcpt@example.org" in status
    assert b"Action: failed" in status
