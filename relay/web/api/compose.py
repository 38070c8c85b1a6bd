"""A JSON submission checked field by field and built into a MIME message.

Everything here is pure (no I/O), so each refusal names the field at fault the same way
for the API and the page's test form: `to[2]`, `headers.X-Tag`, `attachments[0].content`.
The message is written by a small MIME writer of its own (the email package cost over 1 ms a
message, capping HTTP submission below what SMTP accepts): CRLF line ends, lines of at
most 998 octets, RFC 2047 encoded-words and 7-bit transfer encodings, so what the relay
stores is ASCII unless an address's domain needs SMTPUTF8, and every upstream can carry
it unchanged.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from relay.address import Problem, mailbox_problem

#: Fields a JSON submission may carry; anything else is refused by name.
FIELDS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply_to",
        "subject",
        "text",
        "html",
        "headers",
        "attachments",
        "tags",
    }
)
ATTACHMENT_FIELDS = frozenset({"filename", "content_type", "content"})
# Headers with a field of their own, or that the relay writes: setting them through
# `headers` would put recipients in the header that the envelope does not have (or hide
# ones it has), or break the MIME structure built here.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "sender",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "received",
        "return-path",
        "dkim-signature",
        "resent-from",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-sender",
    }
)
# RFC 5322 2.2: a field name is printable ASCII except the colon.
HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")
# What may not appear in any text that becomes a header: C0 controls but tab, DEL, and
# the characters str.splitlines() breaks at (the email package refuses them as newlines).
UNSAFE_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
# JSON can carry a lone surrogate ("\ud800"), which no encoding can write.
SURROGATE = re.compile(r"[\ud800-\udfff]")
MESSAGE_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")
CONTENT_TYPE = re.compile(r"([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)/([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)")
# A display name with its address: `Name <a@b>` or `"Name, Jr" <a@b>`.
NAMED = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([^<>"]*?))\s*<([^<>]*)>\s*')
MAX_HEADERS = 50
MAX_TEXT = 998  # a header value, a name or a filename
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 20, 64, 256
MAX_MESSAGE_ID = 998 - len("Message-ID: ")
MAX_TYPE_NAME = 127


class SubmitError(Exception):
    """A submission the relay refuses, with the HTTP status, a code, what to fix, and the
    request field at fault (None when it is the request as a whole)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        # Seconds for a Retry-After header (503: the queue cannot take mail now).
        self.retry_after: int | None = None


def invalid(field_name: str, message: str) -> SubmitError:
    return SubmitError(400, "invalid_field", f"{field_name}: {message}", field_name)


@dataclass(slots=True)
class Composed:
    """A message built from JSON, with the envelope it goes to."""

    mail_from: str
    rcpts: tuple[str, ...]
    # The request field each recipient came from ("to[0]", "bcc[2]"), for refusals.
    rcpt_fields: tuple[str, ...]
    data: bytes
    smtputf8: bool
    subject: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Mailbox:
    name: str
    address: str


def compose(payload: Any, *, msg_id: str, hostname: str, now: float) -> Composed:
    """Check `payload` and build the message. Raises SubmitError naming the first field
    at fault; builds nothing when any field is wrong."""
    if not isinstance(payload, dict):
        raise SubmitError(400, "invalid_json", "the body must be a JSON object", "body")
    unknown = sorted(set(payload) - FIELDS)
    if unknown:
        raise invalid(unknown[0], f"unknown field; the fields are {', '.join(sorted(FIELDS))}")
    sender = parse_mailbox(_required_text(payload, "from"), "from")
    to = _mailbox_list(payload, "to")
    cc = _mailbox_list(payload, "cc")
    bcc = _mailbox_list(payload, "bcc")
    if not (to or cc or bcc):
        raise invalid("to", "give at least one recipient in to, cc or bcc")
    reply_to = payload.get("reply_to")
    reply = None if reply_to is None else parse_mailbox(_text(reply_to, "reply_to"), "reply_to")
    subject = _header_text(payload.get("subject", ""), "subject")
    text = _optional_body(payload, "text")
    html = _optional_body(payload, "html")
    headers = _custom_headers(payload.get("headers"))
    attachments = _attachments(payload.get("attachments"))
    tags = _tags(payload.get("tags"))

    everyone = [sender, *to, *cc, *bcc, *([reply] if reply else [])]
    smtputf8 = not all(m.address.isascii() for m in everyone)
    head = [_address_field("From", [sender])]
    if to:
        head.append(_address_field("To", to))
    if cc:
        head.append(_address_field("Cc", cc))
    if reply is not None:
        head.append(_address_field("Reply-To", [reply]))
    head.append(_unstructured("Subject", subject))
    head.append(f"Date: {_date(now)}\r\n")
    message_id = headers.pop("message-id", (None, f"<{msg_id}@{hostname}>"))[1]
    head.append(f"Message-ID: {message_id}\r\n")
    head.extend(_unstructured(name, value) for name, value in headers.values())
    head.append("MIME-Version: 1.0\r\n")
    content_headers, body = _content(text, html, attachments)
    # Each address once (SMTP would take a repeat, and deliver twice).
    fields: dict[str, str] = {}
    for name, mailboxes in (("to", to), ("cc", cc), ("bcc", bcc)):
        for i, mailbox in enumerate(mailboxes):
            fields.setdefault(mailbox.address, f"{name}[{i}]")
    return Composed(
        mail_from=sender.address,
        rcpts=tuple(fields),
        rcpt_fields=tuple(fields.values()),
        # UTF-8 only in an address's domain, and only when the message needs SMTPUTF8.
        data="".join(head).encode("utf-8") + content_headers + b"\r\n" + body,
        smtputf8=smtputf8,
        subject=subject,
        tags=tags,
    )


# -- the MIME writer -------------------------------------------------------------------
#
# The email package spent over 1 ms on a 5 KB message (header objects, content managers,
# the generator's refolding): a third of the web process's time per submission. What is
# written here is a fixed shape (a few headers, text and html parts, base64 attachments),
# so it is written directly; the property tests in tests/web/test_api_compose.py read
# every kind of output back with the email package's parser.

CRLF = "\r\n"
# RFC 5322 2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998.
FOLD_AT, MAX_LINE = 78, 998
# RFC 2047 2: an encoded-word is at most 75 characters; "=?utf-8?q?" and "?=" take 12.
WORD_OVERHEAD = 12
WORD_ROOM = 75 - WORD_OVERHEAD
# RFC 2047 5(3): in a phrase a Q-encoded word may carry only these as themselves (and
# "_" for a space); the same set is safe in unstructured text, so one table serves both.
Q_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/"
Q_ASCII: dict[str, str] = {
    chr(c): chr(c) if c in Q_SAFE else "_" if c == 0x20 else f"={c:02X}" for c in range(128)
}
# Text a lenient reader might take for an encoded-word (the email package decodes them
# inside words, with spaces in them, and "=??B?=00" too): written as encoded-words
# itself, so it reads back as it was sent.
LOOKS_ENCODED = re.compile(r"=\?.*\?=")
# A display name that needs no quotes: atoms separated by single spaces (RFC 5322 3.2.3).
ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# A word with the white space before it: folding before a token keeps every character.
TOKEN = re.compile(r"[ \t]*[^ \t]+")
# RFC 2231 attribute-char, less what `quote` always leaves alone (letters, digits, _.-~).
ATTRIBUTE_SAFE = "!#$&+^`|"
FILENAME_CHUNK = 56
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# A part: its header lines (each ending CRLF) and its body (ending CRLF, or empty).
Part = tuple[bytes, bytes]


def _date(now: float) -> str:
    """RFC 5322 3.3 in UTC, with the numeric zone (formatdate's usegmt writes the
    obsolete "GMT"); names spelled out, as strftime's depend on the locale."""
    t = time.gmtime(now)
    return (
        f"{DAYS[t.tm_wday]}, {t.tm_mday:02d} {MONTHS[t.tm_mon - 1]} {t.tm_year}"
        f" {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def _fold(head: str, tokens: list[str]) -> str:
    """`head` ("Name:") and tokens that each start with their white space, as one field:
    a line breaks before a token that would take it past 78 characters, never before the
    first (a field whose value starts on a continuation line reads back with a leading
    space)."""
    lines: list[str] = []
    line = head
    started = False
    for token in tokens:
        if started and len(line) + len(token) > FOLD_AT:
            lines.append(line)
            line = token
        else:
            line += token
            started = True
    lines.append(line)
    return CRLF.join(lines) + CRLF


def _fits(head: str, tokens: list[str]) -> bool:
    """Whether folding at white space keeps every line within 998 octets (ASCII here)."""
    return not tokens or (
        len(head) + len(tokens[0]) <= MAX_LINE and max(map(len, tokens)) <= MAX_LINE
    )


def _plain(text: str) -> bool:
    return text.isascii() and LOOKS_ENCODED.search(text) is None


def _encoded_words(text: str, first_room: int = WORD_ROOM) -> list[str]:
    """`text` as RFC 2047 UTF-8 encoded-words of at most 75 characters, each holding
    whole characters (a reader may decode each word alone). Q unless it is over a quarter
    longer than B (mostly Latin text stays legible). `first_room`: encoded characters the
    first word may hold, so that it fits on the line it starts."""
    data = text.encode("utf-8")
    escaped = len(data.translate(None, Q_SAFE + b" "))
    if 4 * (len(data) + 2 * escaped) <= 5 * ((len(data) + 2) // 3 * 4):
        return _q_words(text, first_room)
    return _b_words(text, first_room)


def _q_words(text: str, first_room: int) -> list[str]:
    words: list[str] = []
    word: list[str] = []
    room = first_room
    for char in text:
        encoded = Q_ASCII.get(char)
        if encoded is None:
            encoded = "".join(f"={byte:02X}" for byte in char.encode("utf-8"))
        if len(encoded) > room and word:
            words.append(f"=?utf-8?q?{''.join(word)}?=")
            word, room = [], WORD_ROOM
        word.append(encoded)
        room -= len(encoded)
    words.append(f"=?utf-8?q?{''.join(word)}?=")
    return words


def _b_words(text: str, first_room: int) -> list[str]:
    words: list[str] = []
    chunk = bytearray()
    room = first_room // 4 * 3  # octets: four base64 characters carry three
    for char in text:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > room and chunk:
            words.append(f"=?utf-8?b?{binascii.b2a_base64(chunk, newline=False).decode()}?=")
            chunk, room = bytearray(), WORD_ROOM // 4 * 3
        chunk += encoded
    words.append(f"=?utf-8?b?{binascii.b2a_base64(chunk, newline=False).decode()}?=")
    return words


def _first_room(used: int) -> int:
    """Room for the first encoded-word after `used` characters of its line (and a
    space); a full word when too little is left to be worth a short one."""
    room = FOLD_AT - used - 1 - WORD_OVERHEAD
    return min(room, WORD_ROOM) if room >= 16 else WORD_ROOM


def _unstructured(name: str, text: str) -> str:
    """Subject or a custom header: as given when it is ASCII that folds within 998
    octets, else encoded-words (the only way to carry non-ASCII, or to break a word too
    long for a line, in unstructured text)."""
    head = f"{name}:"
    if not text:
        return head + CRLF
    if _plain(text):
        tokens = TOKEN.findall(" " + text)
        if _fits(head, tokens):
            return _fold(head, tokens)
    words = _encoded_words(text, _first_room(len(head)))
    return _fold(head, [" " + word for word in words])


def _phrase(name: str, used: int) -> list[str]:
    """A display name's tokens: atoms as they are, other ASCII as a quoted-string (its
    spaces are folding points too), anything else as encoded-words."""
    if _plain(name):
        if ATOMS.fullmatch(name):
            tokens = TOKEN.findall(" " + name)
        else:
            quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
            tokens = TOKEN.findall(" " + quoted)
        if _fits(" " * used, tokens):
            return tokens
    return [" " + word for word in _encoded_words(name, _first_room(used))]


def _address_field(name: str, mailboxes: list[Mailbox]) -> str:
    """The address was checked by SMTP's rules (a subset of RFC 5322 addr-spec, so it is
    written as given); a comma ends every mailbox but the last."""
    head = f"{name}:"
    tokens: list[str] = []
    last = len(mailboxes) - 1
    for i, mailbox in enumerate(mailboxes):
        comma = "," if i < last else ""
        if mailbox.name:
            tokens.extend(_phrase(mailbox.name, len(head) if i == 0 else 1))
            tokens.append(f" <{mailbox.address}>{comma}")
        else:
            tokens.append(f" {mailbox.address}{comma}")
    return _fold(head, tokens)


def _content(
    text: str | None, html: str | None, attachments: list[tuple[str, tuple[str, str], bytes]]
) -> Part:
    """The body's structure: one text part, text and html as multipart/alternative, and
    attachments after them in multipart/mixed."""
    main: Part | None = None
    if text is not None and html is not None:
        main = _multipart("alternative", [_text_part(text, "plain"), _text_part(html, "html")])
    elif text is not None or html is not None:
        main = _text_part(text, "plain") if text is not None else _text_part(html or "", "html")
    elif not attachments:
        main = _text_part("", "plain")
    if not attachments:
        assert main is not None
        return main
    parts = [] if main is None else [main]
    parts.extend(_attachment(*attachment) for attachment in attachments)
    return _multipart("mixed", parts)


def _text_part(text: str, subtype: str) -> Part:
    """7bit when every line is ASCII and at most 998 octets, else quoted-printable. The
    text ends with a line break (added when missing, as the email package does)."""
    if not text.endswith("\n"):
        text += "\n"
    data = text.encode("utf-8").replace(b"\n", b"\r\n")
    if data.isascii() and (len(data) <= MAX_LINE or max(map(len, data.split(b"\r\n"))) <= MAX_LINE):
        encoding = "7bit"
    else:
        # binascii writes the input's line break (CRLF here) for hard and soft breaks,
        # lines of at most 76 characters, and white space before a break as =20 / =09.
        data = binascii.b2a_qp(data, istext=True)
        encoding = "quoted-printable"
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n".encode("ascii"),
        data,
    )


def _attachment(filename: str, ctype: tuple[str, str], content: bytes) -> Part:
    headers = (
        f"Content-Type: {ctype[0]}/{ctype[1]}\r\n"
        f"{_disposition(filename)}"
        "Content-Transfer-Encoding: base64\r\n"
    )
    # encodebytes: lines of 76 characters ending LF, as RFC 2045 6.8 has them.
    return headers.encode("ascii"), base64.encodebytes(content).replace(b"\n", b"\r\n")


def _disposition(filename: str) -> str:
    """Content-Disposition with the filename as a quoted-string when it is printable
    ASCII, else RFC 2231's UTF-8 percent-encoding; a long one in numbered sections
    (RFC 2231 3), each section whole characters (readers decode sections one by one)."""
    head = "Content-Disposition:"
    if filename.isprintable() and _plain(filename):
        chunks = [filename[i : i + FILENAME_CHUNK] for i in range(0, len(filename), FILENAME_CHUNK)]
        values = ['"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks]
        star = ""
    else:
        values = [""]
        for char in filename:
            encoded = quote(char, safe=ATTRIBUTE_SAFE)
            if len(values[-1]) + len(encoded) > FILENAME_CHUNK:
                values.append("")
            values[-1] += encoded
        values[0] = "utf-8''" + values[0]
        star = "*"
    if len(values) == 1:
        return _fold(head, [" attachment;", f" filename{star}={values[0]}"])
    last = len(values) - 1
    tokens = [" attachment;"]
    tokens.extend(
        f" filename*{i}{star}={value}{';' if i < last else ''}" for i, value in enumerate(values)
    )
    return _fold(head, tokens)


def _multipart(subtype: str, parts: list[Part]) -> Part:
    """RFC 2046 5.1.1. Each part's body ends with a line break and the CRLF before a
    delimiter belongs to the delimiter, so one more is written: the part reads back with
    its own. The boundary is random and checked against every part."""
    entities = [headers + b"\r\n" + body for headers, body in parts]
    while True:
        boundary = f"=_{os.urandom(12).hex()}"
        delimiter = b"--" + boundary.encode("ascii")
        if not any(delimiter in entity for entity in entities):
            break
    body = b"".join(delimiter + b"\r\n" + entity + b"\r\n" for entity in entities)
    headers = _fold("Content-Type:", [f" multipart/{subtype};", f' boundary="{boundary}"']).encode(
        "ascii"
    )
    return headers, body + delimiter + b"--\r\n"


def parse_mailbox(value: str, field_name: str) -> Mailbox:
    """`a@b`, `Name <a@b>` or `"Name, Jr" <a@b>`: exactly one mailbox, checked by the same
    rules as SMTP's envelope (non-ASCII is allowed: the message then needs SMTPUTF8)."""
    named = NAMED.fullmatch(value)
    if named is not None:
        quoted, plain, address = named.groups()
        name = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
    elif "<" in value or ">" in value:
        raise invalid(field_name, f"{value!r} is not an address; use a@b or Name <a@b>")
    else:
        name, address = "", value.strip()
    problem = mailbox_problem(address, smtputf8=True)
    if problem is Problem.NO_DOMAIN:
        raise invalid(field_name, f"{address!r} has no domain; use a full address such as a@b")
    if problem is not None:
        raise invalid(field_name, f"{address!r} is not a valid email address")
    if UNSAFE_TEXT.search(name):
        raise invalid(field_name, "the display name contains control characters or line breaks")
    if not address.rpartition("@")[0].isascii():
        # RFC 6532 would allow it, but only with SMTPUTF8 all the way; the email package
        # refused to write it, and the API keeps that answer.
        raise invalid(
            field_name,
            f"{address!r} cannot be written in a header: local-part contains non-ASCII characters",
        )
    return Mailbox(name.strip(), address)


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise invalid(field_name, f"must be a string, not {_json_type(value)}")
    if "\x00" in value:
        raise invalid(field_name, "contains a NUL character")
    if SURROGATE.search(value):
        raise invalid(field_name, "contains a lone surrogate (\\ud800-\\udfff), which is not text")
    return value


def _required_text(payload: dict[str, Any], field_name: str) -> str:
    if field_name not in payload:
        raise invalid(field_name, "is required")
    return _text(payload[field_name], field_name)


def _header_text(value: Any, field_name: str) -> str:
    text = _text(value, field_name)
    if UNSAFE_TEXT.search(text):
        raise invalid(field_name, "contains control characters or line breaks")
    if len(text) > MAX_TEXT:
        raise invalid(field_name, f"is longer than {MAX_TEXT} characters")
    # Trailing space makes the email package fold a whitespace-only line.
    return text.strip()


def _optional_body(payload: dict[str, Any], field_name: str) -> str | None:
    value = payload.get(field_name)
    if value is None:
        return None
    text = _text(value, field_name)
    if "\r" in text.replace("\r\n", ""):
        raise invalid(field_name, "contains a carriage return that does not end a line")
    return text.replace("\r\n", "\n")


def _mailbox_list(payload: dict[str, Any], field_name: str) -> list[Mailbox]:
    value = payload.get(field_name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(field_name, f"must be an array of addresses, not {_json_type(value)}")
    return [
        parse_mailbox(_text(item, f"{field_name}[{i}]"), f"{field_name}[{i}]")
        for i, item in enumerate(value)
    ]


def _custom_headers(value: Any) -> dict[str, tuple[str, str]]:
    """{lower-case name: (name, value)}. Message-ID may be set (threading needs it)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("headers", f"must be an object of name: value, not {_json_type(value)}")
    if len(value) > MAX_HEADERS:
        raise invalid("headers", f"at most {MAX_HEADERS} headers")
    headers: dict[str, tuple[str, str]] = {}
    for name, raw in value.items():
        where = f"headers.{name}"
        if not HEADER_NAME.fullmatch(name):
            raise invalid(where, "a header name is printable ASCII without ':' or spaces")
        lower = name.lower()
        if lower in RESERVED_HEADERS:
            raise invalid(where, _reserved_reason(lower))
        if lower in headers:
            raise invalid(where, "given twice (header names are case-insensitive)")
        text = _header_text(raw, where)
        if lower == "message-id" and not MESSAGE_ID.fullmatch(text):
            raise invalid(where, "must look like <unique@domain>")
        if lower == "message-id" and len(text) > MAX_MESSAGE_ID:
            # One word that cannot be folded: with "Message-ID: " it must fit a line.
            raise invalid(where, f"is longer than {MAX_MESSAGE_ID} characters")
        headers[lower] = (name, text)
    return headers


def _reserved_reason(lower: str) -> str:
    own = {"from": "from", "to": "to", "cc": "cc", "reply-to": "reply_to", "subject": "subject"}
    if lower in own:
        return f"set it with the {own[lower]!r} field"
    if lower == "bcc":
        return "Bcc recipients go in the 'bcc' field; they never appear in the headers"
    return "the relay writes this header itself"


def _attachments(value: Any) -> list[tuple[str, tuple[str, str], bytes]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("attachments", f"must be an array, not {_json_type(value)}")
    found = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, f"must be an object, not {_json_type(item)}")
        unknown = sorted(set(item) - ATTACHMENT_FIELDS)
        if unknown:
            raise invalid(
                f"{where}.{unknown[0]}", "unknown field; use filename, content_type, content"
            )
        filename = _header_text(item.get("filename"), f"{where}.filename")
        if not filename:
            raise invalid(f"{where}.filename", "must not be empty")
        ctype = _text(item.get("content_type", "application/octet-stream"), f"{where}.content_type")
        parts = CONTENT_TYPE.fullmatch(ctype.strip())
        if parts is None:
            raise invalid(f"{where}.content_type", f"{ctype!r} is not a type/subtype")
        maintype, subtype = parts.group(1).lower(), parts.group(2).lower()
        if max(len(maintype), len(subtype)) > MAX_TYPE_NAME:
            raise invalid(
                f"{where}.content_type",
                f"a type or subtype is at most {MAX_TYPE_NAME} characters (RFC 6838 4.2)",
            )
        if maintype in ("multipart", "message"):
            raise invalid(
                f"{where}.content_type",
                f"{maintype}/* cannot be attached as base64; use application/octet-stream",
            )
        encoded = _text(item.get("content"), f"{where}.content")
        try:
            content = binascii.a2b_base64(encoded.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            raise invalid(f"{where}.content", "is not valid base64") from None
        found.append((filename, (maintype, subtype), content))
    return found


def _tags(value: Any) -> dict[str, str]:
    """Labels kept with the message in the queue (searchable later), never in the mail."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("tags", f"must be an object of name: value, not {_json_type(value)}")
    if len(value) > MAX_TAGS:
        raise invalid("tags", f"at most {MAX_TAGS} tags")
    tags = {}
    for key, item in value.items():
        where = f"tags.{key}"
        if not key or len(key) > MAX_TAG_KEY or UNSAFE_TEXT.search(key):
            raise invalid(where, f"a tag name has 1 to {MAX_TAG_KEY} printable characters")
        text = _text(item, where)
        if len(text) > MAX_TAG_VALUE:
            raise invalid(where, f"is longer than {MAX_TAG_VALUE} characters")
        tags[key] = text
    return tags


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
