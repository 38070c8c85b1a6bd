"""A JSON submission checked field by field and built into a MIME message.

Everything here is pure (no I/O), so each refusal names the field at fault the same way
for the API and the page's test form: `to[2]`, `headers.X-Tag`, `attachments[0].content`.
The message is built by the standard library's `email` package with the SMTP policy
(CRLF line ends) and 7-bit transfer encodings: what the relay stores is ASCII unless an
address needs SMTPUTF8, so every upstream can carry it unchanged.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate
from typing import Any

from relay.smtp.address import Problem, mailbox_problem

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

    def header(self) -> Address:
        return Address(display_name=self.name, addr_spec=self.address)


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
    msg = EmailMessage(policy=(SMTPUTF8 if smtputf8 else SMTP).clone(cte_type="7bit"))
    msg["From"] = sender.header()
    if to:
        msg["To"] = [m.header() for m in to]
    if cc:
        msg["Cc"] = [m.header() for m in cc]
    if reply is not None:
        msg["Reply-To"] = reply.header()
    msg["Subject"] = subject
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = headers.pop("message-id", (None, f"<{msg_id}@{hostname}>"))[1]
    for name, value in headers.values():
        msg[name] = value
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    if text is None and html is None and not attachments:
        msg.set_content("")
    for filename, (maintype, subtype), content in attachments:
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    if "MIME-Version" not in msg:
        msg["MIME-Version"] = "1.0"
    # Each address once (SMTP would take a repeat, and deliver twice).
    fields: dict[str, str] = {}
    for name, mailboxes in (("to", to), ("cc", cc), ("bcc", bcc)):
        for i, mailbox in enumerate(mailboxes):
            fields.setdefault(mailbox.address, f"{name}[{i}]")
    return Composed(
        mail_from=sender.address,
        rcpts=tuple(fields),
        rcpt_fields=tuple(fields.values()),
        data=msg.as_bytes(),
        smtputf8=smtputf8,
        subject=subject,
        tags=tags,
    )


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
    mailbox = Mailbox(name.strip(), address)
    try:
        mailbox.header()
    except (ValueError, IndexError, TypeError) as exc:
        raise invalid(field_name, f"{address!r} cannot be written in a header: {exc}") from None
    return mailbox


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
