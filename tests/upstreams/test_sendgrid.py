from __future__ import annotations

import base64

import pytest

from relay.config import Config, Duration, UpstreamConfig
from relay.message import Envelope
from relay.outcomes import TransientError
from relay.upstreams.http import retry_after, shared_session
from relay.upstreams.mime_json import convert
from relay.upstreams.registry import create_upstream
from relay.upstreams.sendgrid import SendGridUpstream
from tests.upstreams.conftest import ENVELOPE, MESSAGE, RICH, RICH_ENVELOPE, FailureCase, Pair


async def test_envelope_recipients_are_delivered_with_bcc_kept(sendgrid: Pair) -> None:
    accepted = await sendgrid.send()

    sent = sendgrid.fake.requests[0]
    assert accepted.provider_id == sent.provider_id
    assert sent.body["personalizations"] == [
        {
            "to": [{"email": "to@example.net", "name": "Someone"}],
            "cc": [{"email": "cc@example.net"}],
            "bcc": [{"email": "hidden@example.org"}],
        }
    ]
    assert sent.body["from"] == {"email": "sender@example.com", "name": "Sender"}
    assert sent.body["subject"] == "Hello"
    assert sent.body["content"] == [{"type": "text/plain", "value": "Hi there.\n"}]
    assert sent.body["custom_args"] == {"relay_id": "01HRELAYID"}
    assert sent.body["headers"] == {"Message-ID": "<1@example.com>", "X-Relay-ID": "01HRELAYID"}


async def test_failure_is_classified(sendgrid: Pair, failure: FailureCase) -> None:
    await failure.run(sendgrid)


async def test_attachments_inline_image_and_encoded_headers_pass_sendgrid_checks(
    sendgrid: Pair,
) -> None:
    await sendgrid.send(RICH_ENVELOPE, RICH)

    body = sendgrid.fake.requests[0].body
    assert body["subject"] == "Überweisung für März"
    assert body["from"] == {"email": "juergen@example.com", "name": "Jürgen Müller"}
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    logo, pdf = body["attachments"]
    assert pdf["filename"] == "Rechnung März.pdf" and pdf["disposition"] == "attachment"
    assert base64.b64decode(pdf["content"]) == b"%PDF-1.4 fake"
    assert logo["disposition"] == "inline" and logo["content_id"] == "logo@example.com"
    assert logo["filename"] == "inline-1.png"
    assert body["reply_to"] == {"email": "replies@example.com", "name": "Støtte"}


async def test_unverified_sender_identity_fails_over_without_tripping_the_breaker(
    sendgrid: Pair,
) -> None:
    sendgrid.fake.fail(
        403,
        message="The from address does not match a verified Sender "
        "Identity. Mail cannot be sent until this error is resolved.",
    )
    error = await sendgrid.failure()
    assert isinstance(error, TransientError) and not error.upstream_wide
    assert error.sender_scoped


async def test_rate_limit_reset_header_gives_retry_after(sendgrid: Pair) -> None:
    sendgrid.upstream.clock = lambda: 1_700_000_000.0
    sendgrid.fake.fail(429, headers={"X-RateLimit-Reset": "1700000042"})
    error = await sendgrid.failure()
    assert isinstance(error, TransientError) and error.retry_after == 42.0


async def test_header_recipient_outside_envelope_is_never_mailed(sendgrid: Pair) -> None:
    only_to = Envelope(ENVELOPE.mail_from, ("to@example.net",))  # a retry for one recipient
    error = await sendgrid.failure(only_to)
    assert isinstance(error, TransientError) and not error.upstream_wide
    assert "cc@example.net" in error.reason
    assert sendgrid.fake.requests == []
    assert (
        sendgrid.upstream.refusal(
            only_to, b"To: to@example.net\r\nCc: cc@example.net\r\nFrom: a@example.com\r\n\r\nx"
        )
        is not None
    )


async def test_attachment_only_scan_gets_a_blank_text_body(sendgrid: Pair) -> None:
    scan = (
        b"From: scanner@example.com\r\nTo: to@example.net\r\nSubject: Scan\r\n"
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"%PDF")
        + b"\r\n"
    )
    await sendgrid.send(Envelope("scanner@example.com", ("to@example.net",)), scan)
    body = sendgrid.fake.requests[0].body
    assert body["content"] == [{"type": "text/plain", "value": " "}]
    assert body["attachments"][0]["filename"] == "attachment-1.pdf"


async def test_created_from_config_with_secret_from_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SG_KEY", "sg-secret")
    common = UpstreamConfig(
        name="sg",
        type="sendgrid",
        timeout=Duration(3.0),
        options={"api_key": "env:SG_KEY", "categories": ["relay"], "ip_pool": "transactional"},
    )
    upstream = create_upstream(common, "upstream[0]", Config())
    assert isinstance(upstream, SendGridUpstream)
    assert upstream.api_key == "sg-secret" and upstream.timeout == 3.0
    assert upstream.base_url == "https://api.sendgrid.com"
    payload = upstream.payload(convert(ENVELOPE, MESSAGE))
    assert payload["categories"] == ["relay"] and payload["ip_pool_name"] == "transactional"


async def test_http_upstreams_share_one_session_until_the_last_closes(sendgrid: Pair) -> None:
    other = SendGridUpstream("second", api_key="k", base_url=sendgrid.fake.url, timeout=1.0)
    await other.start()
    assert shared_session.users == 2
    await other.close()
    assert shared_session.users == 1
    await sendgrid.send()  # the first upstream's session is still open


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"Retry-After": "Tue, 14 Nov 2023 22:14:20 GMT"}, 60.0),
        ({"X-RateLimit-Reset": "1700000030"}, 30.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_dates_and_reset_times(
    headers: dict[str, str], expected: float | None
) -> None:
    assert retry_after(headers, now=1_700_000_000.0) == expected
