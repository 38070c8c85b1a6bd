"""Outbound delivery through the `smtp` upstream into a real aiosmtpd sink: byte-for-byte
hand-off, deferral while the smarthost is down, permanent refusals, per-recipient outcomes
and expiry."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.message import Envelope
from relay.outcomes import PermanentError
from relay.queue.base import StoreError
from relay.upstreams.smtp import _rcpt_command
from tests.conftest import (
    RelayFactory,
    SMTPSink,
    make_message,
    smtp_upstream,
    states,
    strip_received,
    wait_states,
)

FAST = {
    "retry": {"schedule": ["1s"], "max_age": "1h", "bounces": False},
    "routing": {"cooldown": "0.05s"},
}


async def send(
    relay: Relay, data: bytes, rcpts: list[str], sender: str = "app@example.com"
) -> None:
    await aiosmtplib.send(
        data,
        sender=sender,
        recipients=rcpts,
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )


async def timeline(relay: Relay) -> list[dict[str, object]]:
    [row] = await relay.queue.search()
    return await relay.queue.timeline(row.id)


async def test_smarthost_receives_message_byte_for_byte_with_envelope(
    make_relay: RelayFactory, sink: SMTPSink
) -> None:
    relay = await make_relay(upstream=[smtp_upstream(sink.port)], **FAST)
    # Lines that start with dots must survive dot-stuffing on both hops.
    data = make_message(to="to@example.org", body=".one dot\r\n..two dots\r\n.\r\nend\r\n")
    # bcc@example.org is only in the envelope: it must still get the message.
    await send(relay, data, ["to@example.org", "bcc@example.org"])
    await sink.wait_count(1)
    [got] = sink.messages
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["to@example.org", "bcc@example.org"]
    assert strip_received(got.data) == data
    await wait_states(relay, sent=1)
    events = await timeline(relay)
    assert events[-1]["type"] == "sent"
    assert events[-1]["deliveries"] == [
        {
            "upstream": "smarthost",
            "provider_id": "SINK1",
            "recipients": ["to@example.org", "bcc@example.org"],
        }
    ]


async def test_smarthost_down_defers_then_everything_goes_when_it_is_back(
    make_relay: RelayFactory, sink: SMTPSink
) -> None:
    port = sink.port
    await sink.stop()
    relay = await make_relay(upstream=[smtp_upstream(port)], **FAST)
    for i in range(5):
        await send(relay, make_message(subject=f"m{i}"), [f"r{i}@example.org"])
    await wait_states(relay, deferred=5)
    rows = await relay.queue.search()
    assert all(r.last_error for r in rows), rows
    assert any("cannot connect to 127.0.0.1" in (r.last_error or "") for r in rows)

    await sink.start(port)
    await relay.queue.flush(now=time.time(), actor="test")
    assert relay.outbound is not None
    relay.outbound.wake()
    await wait_states(relay, sent=5)
    await sink.wait_count(5)
    assert sorted(m.parsed["Subject"] for m in sink.messages) == [f"m{i}" for i in range(5)]


async def test_permanent_refusal_fails_without_retry_and_says_why(
    make_relay: RelayFactory, sink: SMTPSink
) -> None:
    sink.data_reply = "554 5.7.1 Message rejected by content policy"
    relay = await make_relay(upstream=[smtp_upstream(sink.port)], **FAST)
    await send(relay, make_message(), ["a@example.org"])
    await wait_states(relay, failed=1)
    [row] = await relay.queue.search()
    assert row.attempts == 1
    assert "554 5.7.1 Message rejected by content policy" in (row.last_error or "")
    events = await timeline(relay)
    assert [e["type"] for e in events] == ["received", "attempt", "failed"]
    assert events[1]["outcome"] == "permanent"
    # Nothing comes due again: a flush leaves it alone.
    flushed = await relay.queue.flush(now=time.time(), actor="t")
    assert flushed == []
    assert await states(relay) == {"failed": 1}


async def test_each_recipient_gets_its_own_outcome(
    make_relay: RelayFactory, sink: SMTPSink
) -> None:
    sink.rcpt_replies = {
        "gone@example.org": "550 5.1.1 No such user",
        "busy@example.org": "452 4.2.2 Mailbox full, try later",
    }
    relay = await make_relay(upstream=[smtp_upstream(sink.port)], **FAST)
    await send(relay, make_message(), ["ok@example.org", "gone@example.org", "busy@example.org"])
    await wait_states(relay, deferred=1)
    [row] = await relay.queue.search()
    assert row.rcpts == ["busy@example.org"]
    assert sink.messages[0].rcpt_tos == ["ok@example.org"]

    sink.rcpt_replies = {}
    await relay.queue.flush(now=time.time(), actor="test")
    assert relay.outbound is not None
    relay.outbound.wake()
    # busy@ is delivered on the next round; gone@ stays failed, so the message is failed.
    await wait_states(relay, failed=1)
    await sink.wait_count(2)
    assert sink.messages[1].rcpt_tos == ["busy@example.org"]
    [row] = await relay.queue.search()
    assert "gone@example.org: smarthost" not in (row.last_error or "")
    assert "2 of 3 recipients delivered" in (row.last_error or ""), row.last_error
    assert "550 5.1.1 No such user" in (row.last_error or "")


async def test_message_past_max_age_fails_with_the_last_error(
    make_relay: RelayFactory, sink: SMTPSink
) -> None:
    port = sink.port
    await sink.stop()
    relay = await make_relay(
        upstream=[smtp_upstream(port)],
        retry={"schedule": ["0.1s"], "max_age": "0.3s", "bounces": False},
        routing={"cooldown": "0.01s"},
    )
    await send(relay, make_message(), ["a@example.org"])
    await wait_states(relay, failed=1)
    [row] = await relay.queue.search()
    assert "retry.max_age" in (row.last_error or "")
    assert "cannot connect" in (row.last_error or "")


async def test_utf8_addresses_reach_the_smarthost_with_smtputf8(
    make_relay: RelayFactory, sink: SMTPSink
) -> None:
    relay = await make_relay(upstream=[smtp_upstream(sink.port)], **FAST)
    data = make_message(to="jörg@exämple.org")
    await aiosmtplib.send(
        data,
        sender="app@example.com",
        recipients=["jörg@exämple.org"],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
        mail_options=["SMTPUTF8"],
    )
    await sink.wait_count(1)
    [got] = sink.messages
    assert got.rcpt_tos == ["jörg@exämple.org"]
    await wait_states(relay, sent=1)


async def test_refused_sender_fails_and_the_connection_serves_the_next_message(
    make_relay: RelayFactory, sink: SMTPSink
) -> None:
    """After a refused MAIL nothing else is sent; the pooled session stays in step and
    carries the next message."""
    sink.mail_reply = "553 5.7.1 Sender address rejected: not owned by user"
    relay = await make_relay(upstream=[smtp_upstream(sink.port)], **FAST)
    await send(relay, make_message(subject="refused"), ["a@example.org"])
    await wait_states(relay, failed=1)
    [row] = await relay.queue.search()
    assert "553 5.7.1 Sender address rejected" in (row.last_error or "")
    sink.mail_reply = None
    await send(relay, make_message(subject="next"), ["b@example.org"])
    await wait_states(relay, failed=1, sent=1)
    assert [m.parsed["Subject"] for m in sink.messages] == ["next"]


def test_addresses_that_cannot_go_into_a_command_are_refused_for_good() -> None:
    plain = Envelope("app@example.com", ("x@example.org",))
    with pytest.raises(PermanentError, match="not ASCII and SMTPUTF8 is off"):
        _rcpt_command(plain, "jörg@example.org")
    with pytest.raises(PermanentError, match="cannot be written"):
        _rcpt_command(plain, "a@example.org>\r\nRCPT TO:<b@example.org")
    utf8 = Envelope("app@example.com", ("x@example.org",), smtputf8=True)
    assert _rcpt_command(utf8, "jörg@example.org") == "RCPT TO:<jörg@example.org>".encode()


async def test_an_outcome_the_queue_cannot_record_is_kept_and_recorded_when_it_can(
    make_relay: RelayFactory,
    sink: SMTPSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Disk full (or the database restarting) just as a delivery finishes: the outcome is
    not dropped to wait for the lease (5 minutes by default, and a resend); it is recorded
    as soon as the queue takes writes again, with one log line each way, no traceback."""
    caplog.set_level(logging.INFO, logger="relay.dispatch")
    relay = await make_relay(upstream=[smtp_upstream(sink.port)], **FAST)
    real = relay.queue.record_round
    failures = 3

    async def full_disk(*args: Any, **kwargs: Any) -> bool:
        nonlocal failures
        if failures:
            failures -= 1
            raise StoreError("queue write failed: database or disk is full")
        return await real(*args, **kwargs)

    monkeypatch.setattr(relay.queue, "record_round", full_disk)
    await send(relay, make_message(), ["a@example.org"])
    await wait_states(relay, sent=1)
    assert len(sink.messages) == 1  # delivered once, not again after a lease expiry
    [row] = await relay.queue.search()
    assert [e["type"] for e in await relay.queue.timeline(row.id)][-2:] == ["attempt", "sent"]
    kept = [r for r in caplog.records if "outcome kept" in r.getMessage()]
    recorded = [r for r in caplog.records if "outcome recorded" in r.getMessage()]
    assert len(kept) == 1 and len(recorded) == 1
    assert not any(r.exc_info for r in caplog.records)
