"""MIME parsing and attachment file names that can't escape their directory."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP

import pytest

from relay.inbound.parse import parse_message, safe_filename
from tests.fakes.ses_inbound import SIMPLE_MESSAGE


def build(
    *,
    attachments: list[tuple[str | None, str, bytes]] = (),  # type: ignore[assignment]
    html: str | None = "<p>Hello</p>",
    text: str = "Hello\n",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Älice Example <alice@example.com>"
    msg["To"] = "docs@example.com, Bob <bob@example.com>"
    msg["Cc"] = "carol@example.com"
    msg["Subject"] = "Rechnung März"
    msg["Message-ID"] = "<m1@example.com>"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=SMTP)


def test_fields_bodies_and_attachments() -> None:
    raw = build(
        attachments=[
            ("invoice.pdf", "application/pdf", b"%PDF-1.7 data"),
            ("photo.jpg", "image/jpeg", b"\xff\xd8\xff\xe0jpeg"),
        ]
    )
    p = parse_message(raw)
    assert p.subject == "Rechnung März"
    assert p.from_ == ("alice@example.com",)
    assert p.to == ("docs@example.com", "bob@example.com")
    assert p.cc == ("carol@example.com",)
    assert p.header_recipients() == ("docs@example.com", "bob@example.com", "carol@example.com")
    assert p.message_id == "<m1@example.com>"
    assert p.text is not None and p.text.splitlines() == ["Hello"]
    assert p.html is not None and "<p>Hello</p>" in p.html
    assert [(a.filename, a.content_type, a.data) for a in p.attachments] == [
        ("invoice.pdf", "application/pdf", b"%PDF-1.7 data"),
        ("photo.jpg", "image/jpeg", b"\xff\xd8\xff\xe0jpeg"),
    ]
    json_view = p.to_json()
    assert json_view["attachments"][0]["size"] == len(b"%PDF-1.7 data")
    assert "data" not in json_view["attachments"][0]


def test_scanner_style_message() -> None:
    p = parse_message(SIMPLE_MESSAGE)
    assert p.text is not None and p.text.strip() == "Please find the scan attached."
    assert [a.filename for a in p.attachments] == ["scan 42.pdf"]
    assert p.attachments[0].data == b"%PDF-1.4 fake scan\n"


def test_traversal_in_attachment_name_is_neutralised() -> None:
    p = parse_message(build(attachments=[("../../etc/passwd", "text/plain", b"root:x:0:0")]))
    [att] = p.attachments
    assert att.filename == "passwd"
    assert att.original_filename == "../../etc/passwd"


def test_attachment_without_name_gets_one() -> None:
    p = parse_message(build(attachments=[(None, "application/pdf", b"%PDF")]))
    [att] = p.attachments
    assert att.filename.endswith(".pdf") and "/" not in att.filename


def test_encoded_word_and_rfc2231_filenames() -> None:
    raw = (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=UTF-8''%C3%BCbersicht%2F..%2Fx.xlsx\r\n"
        b"\r\nDATA\r\n--B--\r\n"
    )
    p = parse_message(raw)
    assert p.subject == "Grüße"
    assert p.attachments[0].filename == "x.xlsx"


def test_attached_message_is_one_attachment() -> None:
    inner = EmailMessage()
    inner["From"] = "orig@example.com"
    inner["Subject"] = "Rechnung"
    inner.set_content("original body")
    outer = EmailMessage()
    outer["From"] = "fwd@example.com"
    outer["To"] = "docs@example.com"
    outer["Subject"] = "Fwd"
    outer.set_content("see attached")
    outer.add_attachment(inner, filename="orig.eml")
    p = parse_message(outer.as_bytes(policy=SMTP))
    [att] = p.attachments
    assert (att.content_type, att.filename) == ("message/rfc822", "orig.eml")
    assert att.data.startswith(b"From: orig@example.com\r\nSubject: Rechnung\r\n")
    assert b"original body" in att.data


def test_malformed_mime_does_not_raise() -> None:
    raw = (
        b"From: broken\r\nSubject: =?bogus-charset?q?x?=\r\n"
        b"Content-Type: multipart/mixed; boundary=NOPE\r\n\r\n"
        b"no boundary ever appears\r\n"
    )
    p = parse_message(raw)
    assert p.from_ == ()
    assert isinstance(p.subject, str)


def test_unknown_charset_body_is_still_read() -> None:
    raw = (
        b"From: a@example.com\r\nContent-Type: text/plain; charset=x-made-up\r\n\r\ncaf\xc3\xa9\r\n"
    )
    p = parse_message(raw)
    assert p.text is not None and "caf" in p.text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\Windows\\system32\\cmd.exe", "cmd.exe"),
        ("/absolute/path.txt", "path.txt"),
        ("..", "attachment"),
        ("...", "attachment"),
        ("", "attachment"),
        (None, "attachment"),
        (".bashrc", "bashrc"),
        ("report.pdf.", "report.pdf"),
        ("  spaced  ", "spaced"),
        ("a\x00b\x1fc\x7f.txt", "a_b_c_.txt"),
        ("evil\u202egnp.exe", "evil_gnp.exe"),
        ('what<>:"|?*.txt', "what_______.txt"),
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("com1.log", "_com1.log"),
        ("console.txt", "console.txt"),
        ("Übersicht 2024.xlsx", "Übersicht 2024.xlsx"),
    ],
)
def test_safe_filename(name: str | None, expected: str) -> None:
    assert safe_filename(name) == expected


def test_overlong_name_keeps_its_extension_and_fits() -> None:
    name = "ä" * 300 + ".pdf"
    safe = safe_filename(name)
    assert safe.endswith(".pdf")
    assert len(safe.encode("utf-8")) <= 255
    safe.encode("utf-8").decode("utf-8")  # not cut inside a character


def test_safe_filename_result_is_always_one_component() -> None:
    for name in ["a/b", "a\\b", "../", "./.", "x/../../y", "\u2044fraction"]:
        safe = safe_filename(name)
        assert "/" not in safe and "\\" not in safe
        assert safe not in (".", "..", "")
