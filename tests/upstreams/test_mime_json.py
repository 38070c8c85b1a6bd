from __future__ import annotations

import base64
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from relay.message import Envelope
from relay.upstreams.mime_json import (
    Attachment,
    Mailbox,
    NotRepresentable,
    _plain_mailboxes,
    convert,
    representable,
    unrepresentable_reason,
)
from tests.upstreams.conftest import ENVELOPE, MESSAGE, RICH, RICH_ENVELOPE


def _msg(headers: str, body: str = "Content-Type: text/plain\n\nhello\n") -> bytes:
    return (headers.strip() + "\n" + body).replace("\n", "\r\n").encode()


SIMPLE_HEADERS = "From: a@example.com\nTo: to@example.net\n"


def test_rich_message_converts_with_decoded_headers_bodies_and_attachments() -> None:
    msg = convert(RICH_ENVELOPE, RICH)

    assert msg.sender == Mailbox("juergen@example.com", "Jürgen Müller")
    assert msg.to == (Mailbox("anna@example.net", "Anna Schön"),)
    assert msg.cc == () and msg.bcc == (Mailbox("bcc@example.org"),)
    assert msg.reply_to == (Mailbox("replies@example.com", "Støtte"),)
    assert msg.subject == "Überweisung für März"
    assert msg.text == "Grüße"
    assert msg.html == '<p>Grüße <img src="cid:logo@example.com"></p>'
    assert msg.attachments == (
        Attachment(
            "inline-1.png", "image/png", bytes.fromhex("89504e470d0a1a0a"), "logo@example.com"
        ),
        Attachment("Rechnung März.pdf", "application/pdf", b"%PDF-1.4 fake"),
    )
    assert msg.headers == (("X-Mailer", "Scan2Mail 3.1"),)
    assert msg.relay_id is None


def test_bcc_is_every_envelope_recipient_missing_from_to_and_cc() -> None:
    msg = convert(ENVELOPE, MESSAGE)
    assert [b.email for b in msg.to] == ["to@example.net"]
    assert [b.email for b in msg.cc] == ["cc@example.net"]
    assert [b.email for b in msg.bcc] == ["hidden@example.org"]
    assert msg.relay_id == "01HRELAYID"


def test_envelope_match_ignores_case_and_duplicates() -> None:
    envelope = Envelope("a@example.com", ("To@Example.NET", "to@example.net"))
    msg = convert(envelope, _msg("From: a@example.com\nTo: to@example.net, TO@example.net\n"))
    assert [b.email for b in msg.to] == ["to@example.net"] and msg.bcc == ()


def test_raw_utf8_headers_from_smtputf8_clients_are_decoded() -> None:
    data = _msg(SIMPLE_HEADERS + "Subject: Grüße aus Zürich\nX-Note: café\n")
    msg = convert(Envelope("a@example.com", ("to@example.net",)), data)
    assert msg.subject == "Grüße aus Zürich"
    assert msg.headers == (("X-Note", "=?utf-8?b?Y2Fmw6k=?="),)


def test_message_rfc822_attachment_is_carried_whole() -> None:
    data = _msg(
        SIMPLE_HEADERS,
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
        "Content-Type: text/plain\n\nsee attached\n--b\n"
        "Content-Type: message/rfc822\n\nSubject: inner\n\ninner body\n--b--\n",
    )
    (attachment,) = convert(Envelope("a@example.com", ("to@example.net",)), data).attachments
    assert attachment.filename == "attachment-1.eml"
    assert b"Subject: inner" in attachment.content


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            _msg(
                SIMPLE_HEADERS,
                'Content-Type: multipart/signed; protocol="application/pkcs7-'
                'signature"; boundary="s"\n\n--s\nContent-Type: text/plain\n\nhi\n--s\n'
                "Content-Type: application/pkcs7-signature\n\nMIIB\n--s--\n",
            ),
            "multipart/signed",
        ),
        (
            _msg(
                SIMPLE_HEADERS,
                'Content-Type: multipart/encrypted; protocol="application/pgp-'
                'encrypted"; boundary="e"\n\n--e\nContent-Type: application/pgp-encrypted\n\n'
                "Version: 1\n--e--\n",
            ),
            "multipart/encrypted",
        ),
        (
            _msg(
                SIMPLE_HEADERS,
                "Content-Type: application/pkcs7-mime; smime-type=enveloped-data\n\nMIIB\n",
            ),
            "application/pkcs7-mime",
        ),
        (
            _msg(
                SIMPLE_HEADERS,
                # A read receipt (RFC 8098) is for machines: only DSNs are converted.
                "Content-Type: multipart/report; report-type=disposition-notification; "
                'boundary="r"\n\n--r\nContent-Type: text/plain\n\nread\n--r\n'
                "Content-Type: message/disposition-notification\n\nReporting-UA: x\n--r--\n",
            ),
            "multipart/report",
        ),
        (_msg(SIMPLE_HEADERS + "Cc: stranger@example.org\n"), "stranger@example.org"),
        (_msg("From: a@example.com\nTo: undisclosed-recipients:;\n"), "To header"),
        (_msg("From: a@example.com, b@example.com\nTo: to@example.net\n"), "exactly one"),
        # The email package's address parser raises AttributeError on this one.
        (_msg(SIMPLE_HEADERS + "Cc: :;r\n"), "Cc header cannot be read"),
        (
            _msg(
                SIMPLE_HEADERS,
                'Content-Type: multipart/alternative; boundary="a"\n\n--a\n'
                "Content-Type: text/plain\n\nhi\n--a\nContent-Type: text/calendar\n\nBEGIN:VCAL\n"
                "--a--\n",
            ),
            "text/calendar",
        ),
        (
            _msg(
                SIMPLE_HEADERS,
                'Content-Type: multipart/mixed; boundary="m"\n\n--m\n'
                "Content-Type: text/plain\n\nfirst\n--m\nContent-Type: image/png\n\nx\n--m\n"
                "Content-Type: text/plain\n\nsecond\n--m--\n",
            ),
            "more than one text/plain",
        ),
    ],
)
def test_lossy_conversions_are_refused(data: bytes, why: str) -> None:
    envelope = Envelope("a@example.com", ("to@example.net",))
    assert not representable(envelope, data)
    assert why in (unrepresentable_reason(envelope, data) or "")
    with pytest.raises(NotRepresentable):
        convert(envelope, data)


def test_bcc_only_message_with_to_recipient_is_representable() -> None:
    envelope = Envelope("a@example.com", ("to@example.net", "secret@example.org"))
    assert representable(envelope, _msg(SIMPLE_HEADERS + "Bcc: secret@example.org\n"))


SINGLE_PART = [
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Grüße aus dem Büro\r\n.leading dot\r\n".encode(),
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe=\r\n aus K=F6ln\r\n",
    b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes("<p>Grüße</p>\r\n".encode()).replace(b"\n", b"\r\n"),
    b"\r\nno content type at all\r\n\r\nsecond paragraph\r\n",
]


@pytest.mark.parametrize("body", SINGLE_PART)
def test_single_part_body_reads_as_the_full_parser_reads_it(body: bytes) -> None:
    """The single-part shortcut (headers parsed, body not fed line by line) must give
    what parsing the whole message gives."""
    data = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
    data += body
    fast = convert(Envelope("a@example.com", ("b@example.org",)), data)
    full = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(full, EmailMessage)
    content = str(full.get_content()).replace("\r\n", "\n")
    assert (fast.html if full.get_content_subtype() == "html" else fast.text) == content


PLAIN_HEADERS = [
    "a@example.com",
    "  a@example.com  ",
    "App <app@example.com>",
    "<app@example.com>",
    "Jane Q. Public <jane@example.com>, bob@example.org,<c@example.net>",
    "Scanner  3rd   floor <scan+tray1@example.com>",
    "O'Brien <ob@example.com>",
    "x_y-z <first.last@sub.example.co.uk>",
]
NOT_PLAIN = [
    '"Doe, Jane" <jane@example.com>',
    "=?utf-8?q?J=C3=BCrgen?= <j@example.com>",
    "Jürgen <j@example.com>",
    "a@example.com (comment)",
    "undisclosed-recipients:;",
    "team: a@example.com, b@example.com;",
    "",
    "<a@[192.0.2.1]>",
    "a@example.com b@example.com",
]


@pytest.mark.parametrize("value", PLAIN_HEADERS)
def test_plain_address_headers_read_as_the_full_parser_reads_them(value: str) -> None:
    parsed = policy.default.header_factory("To", value)
    expected = [Mailbox(a.addr_spec, a.display_name) for a in parsed.addresses]
    assert _plain_mailboxes(value) == expected


@pytest.mark.parametrize("value", NOT_PLAIN)
def test_anything_else_goes_to_the_full_parser(value: str) -> None:
    assert _plain_mailboxes(value) is None


def test_quoted_display_name_with_comma_is_one_mailbox() -> None:
    data = _msg('From: a@example.com\nTo: "Doe, Jane" <to@example.net>\n')
    msg = convert(Envelope("a@example.com", ("to@example.net",)), data)
    assert msg.to == (Mailbox("to@example.net", "Doe, Jane"),)


def test_recent_conversions_hold_a_bounded_amount_of_message_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from relay.upstreams import mime_json

    monkeypatch.setattr(mime_json, "_RECENT_BYTES", 3000)
    monkeypatch.setattr(mime_json, "_recent", type(mime_json._recent)())
    envelope = Envelope("a@example.com", ("to@example.net",))
    for i in range(5):
        convert(
            envelope, _msg(SIMPLE_HEADERS, "Content-Type: text/plain\n\n" + "x" * 1000 + str(i))
        )
    assert sum(len(entry[0]) for entry in mime_json._recent.values()) <= 3000
    assert len(mime_json._recent) >= 1
