"""POST /api/v1/messages: JSON built into MIME, raw messages, SMTP's rules, idempotency,
and refusals that name the field and queue nothing."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import re
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from tests.conftest import RelayFactory, mailgun_upstream, outbox, sqlite_spool, states, wait_states
from tests.fakes.providers import FakeMailgun
from tests.web.api import call, simple_message
from tests.web.conftest import token_entries

PDF = b"%PDF-1.4 not really\x00\xff\xfe binary"


def rich_message() -> dict[str, Any]:
    return simple_message(
        **{
            "from": "Billing Team <billing@example.com>",
            "to": ['"Doe, Jane" <jane@example.org>', "bob@example.org"],
            "cc": ["carol@example.org"],
            "bcc": ["audit@example.net"],
            "reply_to": "support@example.com",
            "subject": "Your invoice: März",
            "text": "Hello Jane,\nyour invoice is attached.\n",
            "html": "<p>Hello Jane,</p><p>your invoice is attached.</p>",
            "headers": {
                "X-Campaign": "invoices-2026",
                "List-Unsubscribe": "<mailto:u@example.com>",
            },
            "attachments": [
                {
                    "filename": "invoice.pdf",
                    "content_type": "application/pdf",
                    "content": base64.b64encode(PDF).decode(),
                }
            ],
            "tags": {"customer": "42"},
        }
    )


async def stored_bytes(relay: Relay, msg_id: str) -> bytes:
    status, data = await call(relay, "GET", f"/messages/{msg_id}/raw")
    assert status == 200, data
    assert isinstance(data, bytes)
    return data


async def pause(relay: Relay, name: str) -> None:
    status, body = await call(relay, "POST", f"/upstreams/{name}/pause")
    assert status == 200 and body["upstream"]["paused"] is True, body
    await relay.router.sync()  # dispatch adopts it now, not at its next sync


async def resume(relay: Relay, name: str) -> None:
    status, body = await call(relay, "POST", f"/upstreams/{name}/resume")
    assert status == 200 and body["upstream"]["paused"] is False, body
    await relay.router.sync()
    # Messages that found every upstream paused were deferred: make them due now.
    status, body = await call(relay, "POST", "/queue/flush")
    assert status == 200, body


def check_mime(data: bytes) -> email.message.EmailMessage:
    """Parse the stored message and check what every message the API builds must have."""
    assert re.search(rb"(?<!\r)\n", data) is None, "a bare LF in the stored message"
    assert data.isascii()
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    for header in ("Received", "Date", "Message-ID", "MIME-Version", "From", "Subject"):
        assert message[header], header
    return message


async def test_a_json_message_is_built_into_mime_and_reaches_the_maildir_byte_for_byte(
    web_relay: Relay,
) -> None:
    await pause(web_relay, "outbox")  # so the stored bytes can be read before delivery
    status, body = await call(web_relay, "POST", "/messages", token="app", json=rich_message())
    assert status == 202 and body["created"] is True, body
    msg_id = body["id"]
    data = await stored_bytes(web_relay, msg_id)

    message = check_mime(data)
    assert message["Bcc"] is None and b"audit@example.net" not in data
    assert message["To"] == '"Doe, Jane" <jane@example.org>, bob@example.org'
    assert message["Cc"] == "carol@example.org"
    assert message["Reply-To"] == "support@example.com"
    assert message["Subject"] == "Your invoice: März"
    assert message["X-Campaign"] == "invoices-2026"
    assert message.get_content_type() == "multipart/mixed"
    alternative, attachment = message.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    text, html = alternative.iter_parts()
    assert text.get_content().replace("\r\n", "\n") == "Hello Jane,\nyour invoice is attached.\n"
    assert "<p>Hello Jane,</p>" in html.get_content()
    assert attachment.get_filename() == "invoice.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_content() == PDF

    status, detail = await call(web_relay, "GET", f"/messages/{msg_id}", token="viewer")
    assert status == 200
    assert detail["from"] == "billing@example.com"
    assert detail["to"] == [
        "jane@example.org",
        "bob@example.org",
        "carol@example.org",
        "audit@example.net",
    ]
    assert detail["tags"] == {"customer": "42"} and detail["subject"] == "Your invoice: März"
    assert detail["headers"]["Subject"] == "Your invoice: März"
    received = detail["timeline"][0]
    assert received["type"] == "received" and received["token"] == "app"
    assert received["form"] == "json" and received["client"] == "127.0.0.1"

    await resume(web_relay, "outbox")
    await wait_states(web_relay, sent=1)
    assert outbox(web_relay) == [data]


async def test_a_json_message_reaches_an_http_provider_byte_for_byte(
    make_relay: RelayFactory, tmp_path: Path, mailgun: FakeMailgun
) -> None:
    relay = await make_relay(
        web={"tokens": token_entries(tmp_path)},
        upstream=[mailgun_upstream(mailgun)],
    )
    await pause(relay, "mailgun")
    status, body = await call(relay, "POST", "/messages", token="app", json=rich_message())
    assert status == 202, body
    data = await stored_bytes(relay, body["id"])
    await resume(relay, "mailgun")
    await wait_states(relay, sent=1)
    (request,) = mailgun.requests
    assert request.body["message"] == [data]
    assert sorted(request.body["to"]) == sorted(
        ["jane@example.org", "bob@example.org", "carol@example.org", "audit@example.net"]
    )
    status, detail = await call(relay, "GET", f"/messages/{body['id']}")
    assert {r["provider_id"] for r in detail["recipients"]} == {request.provider_id}


async def test_a_raw_message_takes_its_envelope_from_the_query(web_relay: Relay) -> None:
    await pause(web_relay, "outbox")
    raw = b"From: <app@example.com>\nTo: <list@example.org>\nSubject: raw one\n\nLF lines.\n"
    status, body = await call(
        web_relay,
        "POST",
        "/messages",
        token="app",
        data=raw,
        params=[("from", "app@example.com"), ("to", "a@example.org"), ("to", "b@example.org")],
        headers={"Content-Type": "message/rfc822"},
    )
    assert status == 202, body
    data = await stored_bytes(web_relay, body["id"])
    assert data.startswith(b"Received: from [127.0.0.1]\r\n\tby relay.test (relay) with HTTP id ")
    assert data.endswith(raw.replace(b"\n", b"\r\n"))  # line ends made CRLF, nothing else
    status, detail = await call(web_relay, "GET", f"/messages/{body['id']}")
    assert detail["from"] == "app@example.com"
    assert detail["to"] == ["a@example.org", "b@example.org"]
    assert detail["subject"] == "raw one" and detail["timeline"][0]["form"] == "raw"
    await resume(web_relay, "outbox")
    await wait_states(web_relay, sent=1)
    assert outbox(web_relay) == [data]


async def test_the_null_sender_needs_to_be_listed_for_the_token(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay(web={"tokens": token_entries(tmp_path, ops=["<>", "*@example.com"])})
    raw_call: dict[str, Any] = {
        "data": b"Subject: bounce\r\n\r\nbody\r\n",
        "headers": {"Content-Type": "message/rfc822"},
        "params": {"from": "<>", "to": "a@example.org"},
    }
    status, body = await call(relay, "POST", "/messages", token="app", **raw_call)
    assert (status, body["error"], body["field"]) == (403, "sender_not_allowed", "from")
    status, body = await call(relay, "POST", "/messages", token="ops", **raw_call)
    assert status == 202, body
    status, detail = await call(relay, "GET", f"/messages/{body['id']}")
    assert detail["from"] == ""


BAD_SUBMISSIONS: list[tuple[Any, int, str]] = [
    ({**simple_message(), "From": "x@example.com"}, 400, "From"),
    ({k: v for k, v in simple_message().items() if k != "from"}, 400, "from"),
    (simple_message(**{"from": 42}), 400, "from"),
    (simple_message(to="rcpt@example.org"), 400, "to"),
    (simple_message(to=[]), 400, "to"),
    (simple_message(to=["rcpt@example.org", "not an address"]), 400, "to[1]"),
    (simple_message(to=["rcpt@example.org", "nodomain"]), 400, "to[1]"),
    (simple_message(cc=["a@example.org, b@example.org"]), 400, "cc[0]"),
    (simple_message(bcc=[None]), 400, "bcc[0]"),
    (simple_message(subject="hi\r\nBcc: victim@example.net"), 400, "subject"),
    (simple_message(subject="line\u2028break"), 400, "subject"),
    (simple_message(headers={"Bcc": "victim@example.net"}), 400, "headers.Bcc"),
    (simple_message(headers={"To": "other@example.net"}), 400, "headers.To"),
    (simple_message(headers={"Content-Type": "text/html"}), 400, "headers.Content-Type"),
    (simple_message(headers={"X-Ok": "a\nBcc: victim@example.net"}), 400, "headers.X-Ok"),
    (simple_message(headers={"Bad Name": "x"}), 400, "headers.Bad Name"),
    (simple_message(headers={"X-Num": 5}), 400, "headers.X-Num"),
    (simple_message(headers=["X-A: b"]), 400, "headers"),
    (simple_message(headers={"Message-ID": "no-brackets"}), 400, "headers.Message-ID"),
    (
        simple_message(attachments=[{"filename": "a.txt", "content": "!!not base64"}]),
        400,
        "attachments[0].content",
    ),
    (
        simple_message(attachments=[{"filename": "a\r\n.txt", "content": ""}]),
        400,
        "attachments[0].filename",
    ),
    (
        simple_message(attachments=[{"filename": "a", "content": "", "content_type": "nope"}]),
        400,
        "attachments[0].content_type",
    ),
    (
        simple_message(attachments=[{"filename": "a", "content": "", "size": 1}]),
        400,
        "attachments[0].size",
    ),
    (simple_message(attachments={"filename": "a"}), 400, "attachments"),
    (simple_message(tags={"t": 1}), 400, "tags.t"),
    (simple_message(text=["x"]), 400, "text"),
    (simple_message(text="bare\rcr"), 400, "text"),
    ([simple_message()], 400, "body"),
]


@pytest.mark.parametrize(("payload", "status", "field"), BAD_SUBMISSIONS)
async def test_a_bad_submission_names_the_field_and_queues_nothing(
    web_relay: Relay, payload: Any, status: int, field: str
) -> None:
    got, body = await call(web_relay, "POST", "/messages", token="app", json=payload)
    assert (got, body.get("field")) == (status, field), body
    assert body["error"] and body["message"]
    assert await states(web_relay) == {}


@pytest.mark.parametrize(
    ("data", "content_type", "status", "error"),
    [
        (b"{", "application/json", 400, "invalid_json"),
        (b"[" * 100_000, "application/json", 400, "invalid_json"),
        (b'{"from": NaN}', "application/json", 400, "invalid_json"),
        (b"\xff\xfe", "application/json", 400, "invalid_json"),
        (b"from=a", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"no header here", "message/rfc822", 400, "invalid_field"),
    ],
)
async def test_bodies_that_are_not_a_message_are_4xx(
    web_relay: Relay, data: bytes, content_type: str, status: int, error: str
) -> None:
    got, body = await call(
        web_relay,
        "POST",
        "/messages",
        token="app",
        data=data,
        params={"from": "a@example.com", "to": "b@example.org"}
        if content_type == "message/rfc822"
        else None,
        headers={"Content-Type": content_type},
    )
    assert (got, body["error"]) == (status, error), body
    assert await states(web_relay) == {}


async def test_size_and_recipient_limits_are_smtps(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay(
        web={"tokens": token_entries(tmp_path)},
        smtp={"max_message_size": "20KB", "max_recipients": 3},
    )
    big = simple_message(text="x" * 30_000)
    status, body = await call(relay, "POST", "/messages", token="app", json=big)
    assert (status, body["error"]) == (413, "too_large"), body
    assert "smtp.max_message_size" in body["message"]
    huge = simple_message(text="x" * 200_000)  # past even the JSON body's cap
    status, body = await call(relay, "POST", "/messages", token="app", json=huge)
    assert (status, body["error"], body["field"]) == (413, "request_too_large", "body"), body
    status, body = await call(
        relay,
        "POST",
        "/messages",
        token="app",
        data=b"Subject: x\r\n\r\n" + b"y" * 100_000,
        params={"from": "a@example.com", "to": "b@example.org"},
        headers={"Content-Type": "message/rfc822"},
    )
    assert status == 413, body
    many = simple_message(
        to=["a@example.org", "b@example.org"], cc=["c@example.org"], bcc=["d@example.org"]
    )
    status, body = await call(relay, "POST", "/messages", token="app", json=many)
    assert (status, body["error"], body["field"]) == (400, "too_many_recipients", "bcc[0]")
    assert await states(relay) == {}
    status, body = await call(
        relay, "POST", "/messages", token="app", json=simple_message(text="x" * 10_000)
    )
    assert status == 202, body


async def test_a_token_sends_only_as_its_allowed_senders(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay(web={"tokens": token_entries(tmp_path, app=["*@example.com"])})
    status, body = await call(
        relay, "POST", "/messages", token="app", json=simple_message(**{"from": "x@example.net"})
    )
    assert (status, body["error"], body["field"]) == (403, "sender_not_allowed", "from")
    assert "*@example.com" in body["message"]
    assert await states(relay) == {}
    status, body = await call(relay, "POST", "/messages", token="app", json=simple_message())
    assert status == 202


async def test_the_same_idempotency_key_queues_one_message(web_relay: Relay) -> None:
    await pause(web_relay, "outbox")
    key = {"Idempotency-Key": "order-1234"}
    first = await call(
        web_relay, "POST", "/messages", token="app", json=simple_message(), headers=key
    )
    again = await call(
        web_relay, "POST", "/messages", token="app", json=simple_message(), headers=key
    )
    assert first[0] == 202 and again == (200, {"id": first[1]["id"], "created": False})
    # The key belongs to the token: another token's same key is another message.
    other = await call(
        web_relay, "POST", "/messages", token="ops", json=simple_message(), headers=key
    )
    assert other[0] == 202 and other[1]["id"] != first[1]["id"]

    together = await asyncio.gather(
        *(
            call(
                web_relay,
                "POST",
                "/messages",
                token="app",
                json=simple_message(),
                headers={"Idempotency-Key": "burst"},
            )
            for _ in range(8)
        )
    )
    assert len({body["id"] for _, body in together}) == 1
    assert sorted(status for status, _ in together).count(202) <= 1
    assert sum((await states(web_relay)).values()) == 3

    status, body = await call(
        web_relay,
        "POST",
        "/messages",
        token="app",
        json=simple_message(),
        headers={"Idempotency-Key": "has space"},
    )
    assert (status, body["field"]) == (400, "Idempotency-Key")


async def test_a_queue_that_cannot_store_answers_503_with_retry_after(web_relay: Relay) -> None:
    spool = sqlite_spool(web_relay)
    spool.min_free_disk = 1 << 62  # no disk is that big
    spool._free_checked_at = 0.0
    status, body = await call(web_relay, "POST", "/messages", token="app", json=simple_message())
    assert (status, body["error"]) == (503, "queue_unavailable"), body
    assert "nothing was queued" in body["message"]
    assert await states(web_relay) == {}
