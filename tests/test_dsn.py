"""Delivery status notifications: structure per RFC 3464/6522, and no bounce loops."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

import pytest

from relay.dsn import build_dsn, diagnostic_code, dsn_envelope, should_bounce, status_code
from relay.message import Envelope

ORIGINAL = (
    b"From: App <app@example.com>\r\n"
    b"To: bob@dest.test\r\n"
    b"Subject: Your invoice\r\n"
    b"Message-ID: <inv-42@example.com>\r\n"
    b"\r\n"
    b"The body, which the report must not carry.\r\n"
)
ENVELOPE = Envelope("app@example.com", ("bob@dest.test", "carol@dest.test"))
ARRIVAL = 1_700_000_000.0


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def build(**overrides: object) -> bytes:
    args: dict[str, object] = dict(
        original=ORIGINAL,
        envelope=ENVELOPE,
        failed={
            "bob@dest.test": "550 5.1.1 <bob@dest.test>: Recipient address rejected",
            "carol@dest.test": "sendgrid: HTTP 400: invalid recipient",
        },
        reporting_mta="relay.example.com",
        queue_id="01HQ5ABCDEF",
        arrival=ARRIVAL,
        now=ARRIVAL + 60,
    )
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def part(report: EmailMessage, index: int) -> EmailMessage:
    parts = report.get_payload()
    assert isinstance(parts, list)
    found = parts[index]
    assert isinstance(found, EmailMessage)
    return found


def text_of(report: EmailMessage, index: int = 0) -> str:
    content = part(report, index).get_content()
    assert isinstance(content, str)
    return content


def raw_of(report: EmailMessage, index: int) -> bytes:
    payload = part(report, index).get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def status_blocks(report: EmailMessage) -> list[Message]:
    status = part(report, 1)
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def test_failed_dsn_has_the_three_parts_in_order() -> None:
    report = parse(build())

    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert report["To"] == "app@example.com"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Message-ID"] and report["Date"]
    types = [part(report, i).get_content_type() for i in range(3)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert not report.defects


def test_human_readable_part_says_what_failed_and_what_to_do() -> None:
    text = text_of(parse(build()))
    assert "could not be delivered" in text
    assert "<bob@dest.test>:" in text and "Recipient address rejected" in text
    assert "invalid recipient" in text
    assert "What you can do" in text
    assert "01HQ5ABCDEF" in text


def test_delivery_status_fields_per_message_and_per_recipient() -> None:
    message_fields, bob, carol = status_blocks(parse(build()))

    assert message_fields["Reporting-MTA"] == "dns; relay.example.com"
    assert message_fields["Arrival-Date"] == email.utils.formatdate(ARRIVAL)
    assert bob["Final-Recipient"] == "rfc822; bob@dest.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Diagnostic-Code"] == ("smtp; 550 5.1.1 <bob@dest.test>: Recipient address rejected")
    # An API error has no SMTP reply to quote: generic status, no Diagnostic-Code.
    assert carol["Final-Recipient"] == "rfc822; carol@dest.test"
    assert carol["Status"] == "5.0.0"
    assert carol["Diagnostic-Code"] is None
    assert "invalid recipient" in carol["X-Relay-Reason"]


def test_original_headers_are_included_without_the_body() -> None:
    raw = raw_of(parse(build()), 2)
    assert b"Subject: Your invoice" in raw and b"Message-ID: <inv-42@example.com>" in raw
    assert b"must not carry" not in build()


def test_delayed_dsn() -> None:
    report = parse(
        build(
            kind="delayed",
            will_retry_until=ARRIVAL + 3 * 86400,
            failed={"bob@dest.test": "451 4.7.1 Try again later"},
        )
    )
    assert report["Subject"].startswith("Delayed Mail")
    assert "you do not need to send it again" in text_of(report)
    _, bob = status_blocks(report)
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.7.1"
    assert bob["Will-Retry-Until"] == email.utils.formatdate(ARRIVAL + 3 * 86400)


def test_non_ascii_reason_and_headers_survive() -> None:
    original = "From: Zoë <zoe@example.com>\r\nSubject: Grüße\r\n\r\nx\r\n".encode()
    data = build(original=original, failed={"bob@dest.test": "Postfach voll, später"})
    report = parse(data)
    assert "Postfach voll, später" in text_of(report)
    _, bob = status_blocks(report)
    assert bob["X-Relay-Reason"].isascii()  # delivery-status fields stay ASCII
    assert "Grüße".encode() in raw_of(report, 2)


def test_reason_cannot_inject_fields() -> None:
    data = build(failed={"bob@dest.test": "550 5.1.1 no\r\nAction: delivered\r\nX: y"})
    _, bob = status_blocks(parse(data))
    assert bob.get_all("Action") == ["failed"]
    assert bob["X"] is None


def test_status_and_diagnostic_extraction() -> None:
    assert status_code("550 5.7.1 Message rejected as spam") == "5.7.1"
    assert status_code("421 4.4.2 timeout, later 554 5.4.7 expired") == "5.4.7"
    assert status_code("451 4.3.0 try later") == "5.0.0"  # not a final code
    assert status_code("451 4.3.0 try later", "delayed") == "4.3.0"
    assert status_code("connection refused", "delayed") == "4.0.0"
    assert diagnostic_code("552 mailbox full") == "smtp; 552 mailbox full"
    assert diagnostic_code("remote said: 550 5.1.1 unknown") == "smtp; 550 5.1.1 unknown"
    assert diagnostic_code("postmark: HTTP 422 inactive recipient") is None
    assert diagnostic_code("SES 400: MessageRejected") is None


def test_dsn_goes_out_with_the_null_sender() -> None:
    env = dsn_envelope(ENVELOPE)
    assert env.mail_from == ""
    assert env.rcpt_tos == ("app@example.com",)


@pytest.mark.parametrize(
    ("mail_from", "extra_headers", "expected"),
    [
        ("app@example.com", b"", True),
        ("", b"", False),  # a bounce already
        ("MAILER-DAEMON@example.com", b"", False),
        ("app@example.com", b"Auto-Submitted: auto-replied\r\n", False),
        ("app@example.com", b"Auto-Submitted: auto-generated; owner-email=x@y\r\n", False),
        ("app@example.com", b"Auto-Submitted: no\r\n", True),
        (
            "app@example.com",
            b"Content-Type: multipart/report; report-type=delivery-status;\r\n boundary=x\r\n",
            False,
        ),
        ("app@example.com", b"Content-Type: multipart/mixed; boundary=x\r\n", True),
    ],
)
def test_should_bounce(mail_from: str, extra_headers: bytes, expected: bool) -> None:
    data = extra_headers + ORIGINAL
    assert should_bounce(Envelope(mail_from, ("bob@dest.test",)), data) is expected


def test_our_own_dsn_is_never_bounced() -> None:
    assert should_bounce(Envelope("app@example.com", ("x@y.test",)), build()) is False


def test_dsn_needs_a_recipient_and_a_known_kind() -> None:
    with pytest.raises(ValueError):
        build(failed={})
    with pytest.raises(ValueError):
        build(kind="expanded")
