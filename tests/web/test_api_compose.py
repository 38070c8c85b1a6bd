"""compose(): the MIME the relay writes for a JSON submission, read back by the email
package's own parser (policy default) and held to RFC 5322 / 2045-2047 / 2231's limits."""

from __future__ import annotations

import base64
import binascii
import email
import email.headerregistry
import email.message
import email.policy
import itertools
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.web.api.compose import RESERVED_HEADERS, Composed, SubmitError, compose
from relay.wire import crlf_only

NOW = 1_767_225_600.0  # Thu, 01 Jan 2026 00:00:00 +0000
ENCODED_WORD = re.compile(rb"=\?utf-8\?([qb])\?([^?]*)\?=")
ADJACENT_WORDS = re.compile(r"(=\?utf-8\?[qb]\?[^?]*\?=)\s+(?==\?utf-8\?[qb]\?)")
# A header line over 78 characters is one that had nowhere to fold: a single token.
UNFOLDABLE = re.compile(rb"(?:[!-9;-~]+:)?[ \t]+[^ \t]+")

# What compose() takes in a header (a subject, a display name, a header value, a
# filename): any character but C0 controls other than tab, DEL, line separators and lone
# surrogates.
HEADER_CHARS = st.characters(
    exclude_categories=["Cs"],
    exclude_characters="".join(map(chr, [*range(0x09), *range(0x0A, 0x20), 0x7F]))
    + "\x85\u2028\u2029",
)
# Text that exercises each way of writing a header: plain ASCII, specials, words that
# look encoded, non-ASCII in every script width, and words too long for a line.
HEADER_TEXT = st.one_of(
    st.text(HEADER_CHARS, max_size=120),
    st.text(st.sampled_from(' \tab,;"\\<>()=?_-.:@'), max_size=60),
    st.sampled_from(["=?utf-8?q?=0D=0A?=", "a=?x?b?c?=z", "Your invoice: März", "日本語の件名"]),
    st.builds(
        lambda c, n: (c * n)[:998],
        st.sampled_from(["a", "é", "語", "😀", "a b"]),
        st.integers(1, 400),
    ),
)
ASCII_LOCAL = st.from_regex(r"\A[a-z0-9]{1,6}(?:[._+-][a-z0-9]{1,4}){0,2}\Z")
DOMAINS = st.sampled_from(["example.org", "example.com", "mail.example.net", "exämple.org"])
ADDRESSES = st.one_of(
    st.builds("{}@{}".format, ASCII_LOCAL, DOMAINS),
    st.sampled_from(['"a b"@example.org', "x@[192.0.2.1]", "o'neil@example.org"]),
)
# Text and html bodies: anything but NUL, a bare CR and lone surrogates; some with CRLF
# line ends, some with lines past 998 octets.
BODY_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r")
BODIES = st.one_of(
    st.text(BODY_CHARS, max_size=400),
    st.text(st.sampled_from("ab .=\t\n"), max_size=200).map(lambda t: t.replace("\n", "\r\n")),
    st.builds(
        lambda c, n: c * n + "\n", st.sampled_from(["x", " ", "ü", "--=_"]), st.integers(990, 1100)
    ),
)
CONTENT_TYPES = st.sampled_from(
    ["application/pdf", "image/png", "text/plain", "application/vnd.x+json", "Text/CSV"]
)
HEADER_NAMES = st.from_regex(r"\AX-[!-9;-~]{1,20}\Z")


@st.composite
def mailboxes(draw: Any) -> tuple[str, str, str]:
    """(the payload's string, the address, the display name it should read back as)."""
    address = draw(ADDRESSES)
    name = draw(st.none() | HEADER_TEXT)
    if name is None:
        return address, address, ""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>', address, phrase(name.strip())


@st.composite
def payloads(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid submission and what each field should read back as."""
    sender = draw(mailboxes())
    to = draw(st.lists(mailboxes(), min_size=1, max_size=3))
    cc = draw(st.lists(mailboxes(), max_size=2))
    bcc = draw(st.lists(ADDRESSES, max_size=2))
    payload: dict[str, Any] = {"from": sender[0], "to": [m[0] for m in to], "bcc": bcc}
    expect: dict[str, Any] = {"From": [sender[1:]], "To": [m[1:] for m in to]}
    if cc:
        payload["cc"] = [m[0] for m in cc]
        expect["Cc"] = [m[1:] for m in cc]
    if draw(st.booleans()):
        reply = draw(mailboxes())
        payload["reply_to"] = reply[0]
        expect["Reply-To"] = [reply[1:]]
    subject = draw(HEADER_TEXT)
    payload["subject"] = subject
    expect["subject"] = subject.strip()
    for name in ("text", "html"):
        body = draw(st.none() | BODIES)
        if body is not None:
            payload[name] = body
    names = draw(st.lists(HEADER_NAMES, max_size=3, unique_by=str.lower))
    headers = {n: draw(HEADER_TEXT) for n in names if n.lower() not in RESERVED_HEADERS}
    if headers:
        payload["headers"] = headers
    attachments = draw(
        st.lists(
            st.tuples(
                HEADER_TEXT.filter(lambda f: f.strip() != ""),
                CONTENT_TYPES,
                st.binary(max_size=300),
            ),
            max_size=3,
        )
    )
    if attachments:
        payload["attachments"] = [
            {"filename": f, "content_type": t, "content": base64.b64encode(c).decode()}
            for f, t, c in attachments
        ]
    expect["attachments"] = [(f.strip(), t.lower(), c) for f, t, c in attachments]
    return payload, expect


def build(payload: dict[str, Any]) -> Composed:
    return compose(payload, msg_id="01TESTID", hostname="relay.test", now=NOW)


def parse(data: bytes) -> email.message.EmailMessage:
    # The parser reads bytes as ASCII: UTF-8 (only in an SMTPUTF8 domain) goes as text.
    message = (
        email.message_from_bytes(data, policy=email.policy.default)
        if data.isascii()
        else email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    )
    assert isinstance(message, email.message.EmailMessage)
    return message


def addresses(name: str, raw: str | None) -> list[tuple[str, str]]:
    """(address, display name) as RFC 2047 6.2 reads them: the white space between two
    adjacent encoded-words is not text. Python 3.11's parser keeps it in a display name
    (CPython gh-128110; its unstructured headers drop it), so it is taken out first."""
    if raw is None:
        return []
    value = ADJACENT_WORDS.sub(r"\1", re.sub(r"\r?\n(?=[ \t])", "", raw))
    header = email.policy.default.header_factory(name, value)
    # Words run together are what RFC 2047 forbids, so the parser notes it; no others.
    defects = [d for d in header.defects if "after encoded-word" not in str(d)]
    assert not defects, defects
    return [(a.addr_spec, phrase(a.display_name)) for a in header.addresses]


def phrase(name: str) -> str:
    """A display name's white space is one space (RFC 5322 3.2.5: a phrase is words); the
    parser reads a tab or a run of spaces so, inside encoded-words as well."""
    return re.sub(r"[ \t]+", " ", name)


def as_read(text: str) -> str:
    """A body as the message carries it: LF line ends and a final line break."""
    text = text.replace("\r\n", "\n")
    return text if text.endswith("\n") else text + "\n"


def check_lines(data: bytes) -> None:
    """CRLF everywhere, no line over 998 octets, header lines folded near 78 unless a
    single token is longer, encoded-words of at most 75 characters of whole characters."""
    assert crlf_only(data) and data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    assert max(map(len, lines)) <= 998
    head = lines[: lines.index(b"")]
    for line in head:
        # 78 characters (an SMTPUTF8 domain's are more octets than characters).
        assert len(line.decode("utf-8")) <= 78 or UNFOLDABLE.fullmatch(line), line
        for match in ENCODED_WORD.finditer(line):
            assert len(match.group(0)) <= 75, match.group(0)
            if match.group(1) == b"q":
                raw = binascii.a2b_qp(match.group(2), header=True)
            else:
                raw = binascii.a2b_base64(match.group(2), strict_mode=True)
            raw.decode("utf-8")  # whole characters in each word


def filename(part: email.message.Message) -> str | None:
    """The parameter as the header parser decodes it. get_filename() would also strip a
    pair of quotes or angle brackets around the name (email.utils.unquote)."""
    header = part["Content-Disposition"]
    if header is None:
        return None
    assert isinstance(header, email.headerregistry.ContentDispositionHeader)
    name = header.params.get("filename")
    assert name is None or isinstance(name, str)
    return name


def attachments_of(message: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    return [
        p
        for p in message.walk()
        if isinstance(p, email.message.EmailMessage) and p.get_filename() is not None
    ]


def text_of(message: email.message.EmailMessage, subtype: str) -> str | None:
    for part in message.walk():
        if part.get_content_type() == f"text/{subtype}" and filename(part) is None:
            assert isinstance(part, email.message.EmailMessage)
            content = part.get_content()
            assert isinstance(content, str)
            return content.replace("\r\n", "\n")
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=payloads())
@example(
    case=(
        {"from": "a@example.com", "to": ["b@example.org"], "subject": "x" * 998},
        {
            "From": [("a@example.com", "")],
            "To": [("b@example.org", "")],
            "subject": "x" * 998,
            "attachments": [],
        },
    )
)
def test_what_compose_writes_reads_back_as_the_payload(
    case: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    payload, expect = case
    built = build(payload)
    data = built.data
    check_lines(data)
    ascii_addresses = all(
        a.isascii() for h in ("From", "To", "Cc", "Reply-To") for a, _ in expect.get(h, [])
    )
    # UTF-8 only in a domain in the header; a Bcc recipient's needs SMTPUTF8 all the same.
    assert data.isascii() == ascii_addresses
    bcc_ascii = all(a.isascii() for a in payload.get("bcc", []))
    assert built.smtputf8 == (not (ascii_addresses and bcc_ascii))

    message = parse(data)
    assert not message.defects, message.defects
    assert message["Subject"] == expect["subject"]
    assert message["Bcc"] is None
    assert message["MIME-Version"] == "1.0"
    assert message["Message-ID"] == "<01TESTID@relay.test>"
    assert message["Date"] == "Thu, 01 Jan 2026 00:00:00 +0000"
    raw = dict(message.raw_items())
    for header in ("From", "To", "Cc", "Reply-To"):
        assert addresses(header, raw.get(header)) == expect.get(header, []), header
    for name, value in payload.get("headers", {}).items():
        assert message[name] == value.strip(), name

    text, html = payload.get("text"), payload.get("html")
    if text is None and html is None and not payload.get("attachments"):
        text = ""
    assert text_of(message, "plain") == (None if text is None else as_read(text))
    assert text_of(message, "html") == (None if html is None else as_read(html))
    got = [
        (filename(p), p.get_content_type(), p.get_payload(decode=True))
        for p in attachments_of(message)
    ]
    assert got == expect["attachments"]
    for part in message.walk():
        assert not part.defects, part.defects
        encoding = part.get("Content-Transfer-Encoding")
        if filename(part) is not None:
            assert encoding == "base64"
        elif not part.is_multipart():
            content = part.get_payload(decode=True)
            assert isinstance(content, bytes)
            lines = content.replace(b"\r\n", b"\n").split(b"\n")
            plain = content.isascii() and max(map(len, lines)) <= 998
            assert encoding == ("7bit" if plain else "quoted-printable")


def test_a_5kb_text_message_is_quoted_printable_and_reads_back() -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 111)[:5000]
    payload = {
        "from": "app@example.com",
        "to": ["someone@example.org"],
        "subject": "api load",
        "text": text,
    }
    built = build(payload)
    check_lines(built.data)
    assert built.data.isascii() and not built.smtputf8
    body = built.data.split(b"\r\n\r\n", 1)[1]
    assert max(map(len, body.split(b"\r\n"))) <= 76
    message = parse(built.data)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content().replace("\r\n", "\n") == text + "\n"


def test_the_header_section_is_written_in_a_fixed_order() -> None:
    built = build(
        {
            "from": "Billing Team <billing@example.com>",
            "to": ['"Doe, Jane" <jane@example.org>', "bob@example.org"],
            "bcc": ["audit@example.net"],
            "subject": "Your invoice: März",
            "text": "Hello Jane,\nyour invoice.\n",
            "headers": {"X-Campaign": "invoices-2026"},
        }
    )
    assert built.data == (
        b"From: Billing Team <billing@example.com>\r\n"
        b'To: "Doe, Jane" <jane@example.org>, bob@example.org\r\n'
        b"Subject: =?utf-8?q?Your_invoice=3A_M=C3=A4rz?=\r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <01TESTID@relay.test>\r\n"
        b"X-Campaign: invoices-2026\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"\r\n"
        b"Hello Jane,\r\nyour invoice.\r\n"
    )
    assert built.rcpts == ("jane@example.org", "bob@example.org", "audit@example.net")


def test_a_long_subject_folds_at_spaces_near_78_characters() -> None:
    subject = " ".join(f"word{i}" for i in range(60))
    data = build({"from": "a@example.com", "to": ["b@example.org"], "subject": subject}).data
    head = data.split(b"\r\n\r\n")[0].split(b"\r\n")
    lines = list(itertools.takewhile(lambda line: not line.startswith(b"Date:"), head[2:]))
    assert len(lines) > 3 and all(60 <= len(line) <= 78 for line in lines[:-1])
    assert parse(data)["Subject"] == subject


def test_a_long_non_ascii_filename_is_split_in_rfc2231_sections() -> None:
    filename = "Überweisung-" * 20 + "😀.pdf"
    built = build(
        {
            "from": "a@example.com",
            "to": ["b@example.org"],
            "attachments": [
                {"filename": filename, "content": base64.b64encode(b"\xff" * 100).decode()}
            ],
        }
    )
    check_lines(built.data)
    assert b"filename*0*=utf-8''%C3%9C" in built.data
    (part,) = attachments_of(parse(built.data))
    assert part.get_filename() == filename
    assert part.get_payload(decode=True) == b"\xff" * 100


def test_the_boundary_is_redrawn_when_the_content_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([b"\x00" * 12, b"\x00" * 12, b"\x11" * 12, b"\x22" * 12])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    text = f"a line\n--=_{'00' * 12}\n"
    built = build(
        {"from": "a@example.com", "to": ["b@example.org"], "text": text, "html": "<p>x</p>"}
    )
    assert f'boundary="=_{"11" * 12}"'.encode() in built.data
    assert text_of(parse(built.data), "plain") == text


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"to": ["jörg@example.org"]}, "to[0]"),
        ({"cc": ["Jörg <jörg@example.org>"]}, "cc[0]"),
        ({"headers": {"Message-ID": f"<{'a' * 990}@b>"}}, "headers.Message-ID"),
        (
            {
                "attachments": [
                    {"filename": "a", "content": "", "content_type": f"application/{'x' * 128}"}
                ]
            },
            "attachments[0].content_type",
        ),
    ],
)
def test_what_cannot_be_written_in_a_header_is_refused_by_field(
    fields: dict[str, Any], field: str
) -> None:
    payload = {"from": "a@example.com", "to": ["b@example.org"], **fields}
    with pytest.raises(SubmitError) as info:
        build(payload)
    assert (info.value.status, info.value.field) == (400, field)


def test_a_non_ascii_domain_is_written_as_utf8_and_needs_smtputf8() -> None:
    built = build({"from": "a@exämple.org", "to": ["b@example.org"], "subject": "ö"})
    assert built.smtputf8 and not built.data.isascii()
    assert "From: a@exämple.org\r\n".encode() in built.data
    assert parse(built.data)["Subject"] == "ö"
