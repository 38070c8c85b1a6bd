"""MIME → the neutral shape JSON-only providers (SendGrid, Postmark) are built from.

Those providers rebuild the message from fields, so a conversion can lose what the fields
cannot hold. Two losses would be silent and harmful (DESIGN.md, "What we learned"):
mailing header recipients who were not RCPT TO, and dropping Bcc. So the envelope decides
who gets the message: header To/Cc recipients keep their place, every other envelope
recipient becomes Bcc, and a message whose To/Cc name anyone outside the envelope is not
converted at all. Signed, encrypted or report MIME, extra body parts and alternatives
with no JSON field are refused too: `unrepresentable_reason()` lets routing skip JSON
providers for such messages instead of sending a damaged copy.

Header values are decoded (RFC 2047 encoded words, and raw UTF-8 from SMTPUTF8 clients) for
the fields that carry text; custom headers are passed on in their encoded wire form.
"""

from __future__ import annotations

import abc
import base64
import mimetypes
import re
from collections import OrderedDict
from dataclasses import dataclass
from email import policy
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import formataddr
from typing import Any, ClassVar

from relay.message import HEADER_END, Envelope, split_message
from relay.upstreams.http import HTTPUpstream, Refused, Request
from relay.upstreams.jsonwire import (
    Escaped,
    ascii_compatible,
    canonical_base64,
    escaped_text,
    serialise,
)
from relay.upstreams.mimebytes import SlicedPart, parse_headers, split

#: Header carrying the relay's own message id, passed to providers as custom data so their
#: webhooks can be matched to our timeline.
RELAY_ID_HEADER = "X-Relay-ID"

#: Headers never passed as custom headers: the JSON fields regenerate them, the provider
#: owns them (SendGrid rejects its reserved set: x-sg-id, x-sg-eid, received,
#: dkim-signature, content-type, content-transfer-encoding, to, from, subject, reply-to,
#: cc, bcc), or they certify the original bytes and would be false after the rebuild.
DROPPED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
        "mime-version",
        "content-disposition",
        "content-id",
        "content-description",
        "date",
        "return-path",
        "domainkey-signature",
        "authentication-results",
        "received-spf",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
    }
)
# Structures whose meaning is in the exact MIME: signatures and encryption cover the bytes,
# and a delivery report (RFC 6522) is read by machines part by part.
_OPAQUE_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "multipart/report",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
    }
)
_BODY_TYPES = ("text/plain", "text/html")


class NotRepresentable(Refused):
    """The message cannot go through a JSON-only provider without changing what arrives."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    email: str
    name: str = ""

    def formatted(self) -> str:
        """RFC 5322 form; a non-ASCII name is encoded (RFC 2047), as Postmark expects."""
        return formataddr((self.name, self.email)) if self.name else self.email


class Attachment:
    """A file the provider attaches. Its content is kept as the message's own base64 when
    that is exactly what encoding the decoded bytes would give (the usual case): a 5 MB
    scan is then neither decoded nor encoded again on its way to the JSON."""

    __slots__ = ("_base64", "_content", "content_id", "content_type", "filename")

    def __init__(
        self,
        filename: str,
        content_type: str,
        content: bytes | None = None,
        content_id: str | None = None,  # set for inline parts (referenced as cid: in HTML)
        *,
        base64_chunks: list[bytes] | None = None,
    ) -> None:
        self.filename = filename
        self.content_type = content_type
        self.content_id = content_id
        self._content = content
        self._base64 = base64_chunks

    @property
    def inline(self) -> bool:
        return self.content_id is not None

    @property
    def content(self) -> bytes:
        if self._content is None:
            return base64.b64decode(b"".join(self._base64 or ()))
        return self._content

    def base64(self) -> Escaped:
        """The content in base64 (one line), as a JSON string (base64 needs no escapes)."""
        if self._base64 is not None:
            return Escaped(self._base64)
        return Escaped((base64.b64encode(self.content),))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Attachment):
            return NotImplemented
        return (self.filename, self.content_type, self.content, self.content_id) == (
            other.filename,
            other.content_type,
            other.content,
            other.content_id,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Attachment({self.filename!r}, {self.content_type!r}, cid={self.content_id!r})"


class Body:
    """A text or HTML body: either text already decoded by the email package, or a slice
    of the queued bytes in an ASCII-compatible charset, which becomes JSON without ever
    being one Python string (see relay.upstreams.jsonwire)."""

    __slots__ = ("_codec", "_data", "_end", "_start", "_text")

    def __init__(
        self,
        text: str | None = None,
        *,
        data: bytes = b"",
        start: int = 0,
        end: int = 0,
        codec: str = "ascii",
    ) -> None:
        self._text = text
        self._data, self._start, self._end, self._codec = data, start, end, codec

    @property
    def empty(self) -> bool:
        return not self._text if self._text is not None else self._start >= self._end

    def text(self) -> str:
        """The text with LF line ends, as a JSON document carries it."""
        if self._text is None:
            raw = self._data[self._start : self._end].decode(self._codec, "replace")
            return raw.replace("\r\n", "\n")
        return self._text

    def escaped(self) -> Escaped:
        if self._text is not None:
            return Escaped.of(self._text)
        chunks = escaped_text(
            self._data, self._start, self._end, codec=self._codec, crlf_to_lf=True
        )
        return Escaped(chunks)


@dataclass(frozen=True, slots=True)
class JsonMessage:
    """Everything a JSON provider needs; recipients come from the envelope only."""

    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    reply_to: tuple[Mailbox, ...]
    subject: str
    text_body: Body | None
    html_body: Body | None
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...]  # custom headers, wire form, in message order
    relay_id: str | None

    def bodies(self) -> tuple[Body | None, Body | None]:
        """(text, html), each None when absent or empty: what the providers' one-of-them-
        required content fields are filled from."""
        text = self.text_body if self.text_body is not None and not self.text_body.empty else None
        html = self.html_body if self.html_body is not None and not self.html_body.empty else None
        return text, html

    @property
    def text(self) -> str | None:
        return None if self.text_body is None else self.text_body.text()

    @property
    def html(self) -> str | None:
        return None if self.html_body is None else self.html_body.text()


def unrepresentable_reason(envelope: Envelope, data: bytes) -> str | None:
    """Why a JSON-only provider cannot carry this message faithfully, or None if it can."""
    try:
        convert(envelope, data)
    except NotRepresentable as exc:
        return str(exc)
    return None


def representable(envelope: Envelope, data: bytes) -> bool:
    return unrepresentable_reason(envelope, data) is None


# Routing asks `unrepresentable_reason` of every JSON upstream it considers, and the one
# chosen then builds its request from the same bytes: parsing is most of the CPU an HTTP
# delivery costs, so the last few conversions are kept (keyed by the bytes object itself),
# holding on to at most _RECENT_BYTES of message data.
_RECENT_SIZE = 64
_RECENT_BYTES = 32 * 1024 * 1024
_recent: OrderedDict[int, tuple[bytes, Envelope, JsonMessage | str]] = OrderedDict()


def convert(envelope: Envelope, data: bytes) -> JsonMessage:
    """Parse `data` into a JsonMessage for `envelope`; raise NotRepresentable if lossy."""
    key = id(data)
    hit = _recent.get(key)
    if hit is not None and hit[0] is data and hit[1] == envelope:
        result = hit[2]
    else:
        try:
            result = _convert(envelope, data)
        except NotRepresentable as exc:
            result = str(exc)
        _recent[key] = (data, envelope, result)
        held = sum(len(entry[0]) for entry in _recent.values())
        while len(_recent) > 1 and (len(_recent) > _RECENT_SIZE or held > _RECENT_BYTES):
            held -= len(_recent.popitem(last=False)[1][0])
    if isinstance(result, str):
        raise NotRepresentable(result)
    return result


def _parse(data: bytes, *, crlf_checked: bool = False) -> tuple[EmailMessage, Body | None]:
    """The message as the email package reads it, without feeding a body through its
    line-by-line parser (most of the time at 100 KB, and nine times a 5 MB scan in
    memory). A single-part body is kept as the parser would keep it, undecoded text of
    the original lines, or, when it is text or HTML that needs no decoding, returned as
    a Body over the queued bytes, and the message gets no payload at all. A multipart
    message of the usual shapes gets its parts from `mimebytes.split`, each leaf still in
    the queued bytes; anything else is parsed whole."""
    end = data.find(b"\r\n\r\n")
    if end != -1:
        msg = parse_headers(data[: end + 4])
        maintype = msg.get_content_maintype()
        if maintype not in ("multipart", "message") and not msg.defects:
            body = _raw_body(msg, data, end + 4, len(data))
            if body is None:
                msg.set_payload(data[end + 4 :].decode("ascii", "surrogateescape"))
            return msg, body
        if (
            maintype == "multipart"
            and msg.get_payload() == ""
            and split(data, msg, end + 4, crlf_checked=crlf_checked)
        ):
            return msg, None
    whole = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(whole, EmailMessage)
    return whole, None


def _raw_body(msg: Message, data: bytes, start: int, end: int) -> Body | None:
    """The body as a Body over data[start:end], when the email package would only have
    decoded its charset (no transfer encoding) from one that keeps ASCII as it is; None
    when the part is not a body or needs the package's decoding."""
    if msg.get_content_type() not in _BODY_TYPES or _is_attachment(msg):
        return None
    cte = str(msg.get("content-transfer-encoding", "")).strip().lower()
    charset = msg.get_param("charset", "ASCII")
    if cte not in ("", "7bit", "8bit", "binary") or not isinstance(charset, str):
        return None
    codec = ascii_compatible(charset)
    return None if codec is None else Body(data=data, start=start, end=end, codec=codec)


def _is_attachment(part: Message) -> bool:
    return part.get_content_disposition() == "attachment" or bool(part.get_filename())


def _convert(envelope: Envelope, data: bytes) -> JsonMessage:
    msg, raw_body = _parse(data, crlf_checked=envelope.crlf_only)
    senders = _mailboxes(msg, "From")
    if len(senders) != 1:
        raise NotRepresentable(f"From must name exactly one mailbox, found {len(senders)}")
    to, cc, bcc = _recipients(envelope, msg)
    parts = _Parts()
    if raw_body is not None:
        setattr(parts, "text" if msg.get_content_subtype() == "plain" else "html", raw_body)
    else:
        parts.walk(msg, parent="")
    return JsonMessage(
        sender=senders[0],
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=tuple(_mailboxes(msg, "Reply-To")),
        subject=_text(str(msg.get("Subject", ""))),
        text_body=parts.text,
        html_body=parts.html,
        attachments=tuple(parts.attachments),
        headers=tuple(_custom_headers(data)),
        # Our queue id, from the envelope; a client-set X-Relay-ID header is the fallback
        # for messages converted outside the dispatcher.
        relay_id=envelope.queue_id
        or (_text(str(msg[RELAY_ID_HEADER])).strip() if RELAY_ID_HEADER in msg else None),
    )


def _text(value: str) -> str:
    """Undo the surrogate escapes the parser leaves for raw 8-bit (SMTPUTF8) header bytes."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# Address headers as most software writes them: `addr@dom`, `Name <addr@dom>`, `<addr@dom>`,
# comma-separated, ASCII, no quotes, comments, groups or encoded words. These are read
# with one regular expression; anything else goes to the email package's full RFC 5322
# parser, which is exact but was a sixth of the CPU of an HTTP delivery at 5 KB.
_ADDR_SPEC = r"[^\s@<>\"(),:;\\\[\]]+@[^\s@<>\"(),:;\\\[\]]+"
_PLAIN_MAILBOX = re.compile(
    rf"\s*(?:({_ADDR_SPEC})|([A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.\- \t]*)<({_ADDR_SPEC})>)\s*"
)
_NOT_PLAIN = re.compile(r"=\?|[\"():;\\\[\]\r\n]")


def _plain_mailboxes(value: str) -> list[Mailbox] | None:
    """The mailboxes of a plain address header, or None when it needs the full parser."""
    if not value.isascii() or _NOT_PLAIN.search(value):
        return None
    out: list[Mailbox] = []
    for item in value.split(","):
        match = _PLAIN_MAILBOX.fullmatch(item)
        if match is None:
            return None
        bare, name, addr = match.groups()
        out.append(Mailbox(bare) if bare else Mailbox(addr, " ".join(name.split())))
    return out


def _mailboxes(msg: Message, name: str) -> list[Mailbox]:
    raw = [value for key, value in msg.raw_items() if key.lower() == name.lower()]
    plain = [_plain_mailboxes(value.replace("\r\n", "").replace("\n", "")) for value in raw]
    if all(boxes is not None for boxes in plain):
        return [box for boxes in plain if boxes is not None for box in boxes]
    try:
        headers = msg.get_all(name, [])
    except (AttributeError, IndexError, ValueError) as exc:
        # The email package's address parser fails on some garbage (CPython 3.11:
        # "Cc: :;r" raises AttributeError); routing must get a reason, not an exception.
        raise NotRepresentable(
            f"{name} header cannot be read as addresses ({exc}): a JSON provider needs "
            "its recipients as fields; an SMTP upstream can carry the message as it is"
        ) from None
    out: list[Mailbox] = []
    for header in headers:
        for addr in getattr(header, "addresses", ()):
            assert isinstance(addr, Address)
            if addr.addr_spec and addr.addr_spec != "<>":
                out.append(Mailbox(_text(addr.addr_spec), _text(addr.display_name)))
    return out


def _recipients(
    envelope: Envelope, msg: Message
) -> tuple[tuple[Mailbox, ...], tuple[Mailbox, ...], tuple[Mailbox, ...]]:
    """To and Cc as the headers show them, Bcc for every other envelope recipient."""
    wanted: dict[str, str] = {}
    for rcpt in envelope.rcpt_tos:
        wanted.setdefault(rcpt.lower(), rcpt)
    placed: set[str] = set()
    groups: list[tuple[Mailbox, ...]] = []
    for name in ("To", "Cc"):
        group: list[Mailbox] = []
        for box in _mailboxes(msg, name):
            key = box.email.lower()
            if key not in wanted:
                raise NotRepresentable(
                    f"{name} header names {box.email}, who is not an envelope recipient: "
                    "a JSON provider would mail them"
                )
            if key not in placed:
                placed.add(key)
                group.append(box)
        groups.append(tuple(group))
    to, cc = groups
    if not to:
        raise NotRepresentable(
            "no envelope recipient is in the To header: a JSON provider would have to invent one"
        )
    bcc = tuple(Mailbox(addr) for key, addr in wanted.items() if key not in placed)
    return to, cc, bcc


# Delivery-status notifications (RFC 3464) are advisory: through a JSON-only provider their
# human-readable part becomes the body and the machine-readable parts attachments, so a
# relay whose only upstreams are JSON providers can still tell a sender their mail failed.
_REPORT_PART_NAMES = {
    "message/delivery-status": "delivery-status.txt",
    "text/rfc822-headers": "original-headers.txt",
    "message/rfc822": "original.eml",
}


class _Parts:
    """Walks the MIME tree: one text body, one HTML body, the rest attachments."""

    def __init__(self) -> None:
        self.text: Body | None = None
        self.html: Body | None = None
        self.attachments: list[Attachment] = []

    def walk(self, part: Message, parent: str) -> None:
        ctype = part.get_content_type()
        if ctype == "multipart/report" and not parent and _is_delivery_report(part):
            self._report(part)
            return
        if ctype in _OPAQUE_TYPES:
            raise NotRepresentable(f"{ctype} must reach the recipient byte for byte")
        if ctype.startswith("multipart/"):
            payload = part.get_payload()
            if not isinstance(payload, list):
                # No boundary parameter, or no delimiter line: the email package keeps
                # the body as text, and no provider field could say what it holds.
                raise NotRepresentable(f"{ctype} whose parts cannot be found (boundary?)")
            for child in payload:
                assert isinstance(child, Message)
                self.walk(child, ctype)
            return
        disposition = part.get_content_disposition()
        filename = part.get_filename()
        if ctype in _BODY_TYPES and disposition != "attachment" and not filename:
            self._body(part, ctype)
        elif parent == "multipart/alternative":
            raise NotRepresentable(f"alternative body {ctype} has no JSON field")
        else:
            self._attachment(part, ctype, disposition, filename, parent)

    def _report(self, report: Message) -> None:
        """A DSN: its first (human-readable) part is the body, the others attachments with
        their bytes as generated."""
        children = report.get_payload()
        assert isinstance(children, list)
        for i, child in enumerate(children):
            assert isinstance(child, Message)
            ctype = child.get_content_type()
            if i == 0 and ctype in _BODY_TYPES:
                self._body(child, ctype)
                continue
            _, content = split_message(child.as_bytes())
            if ctype == "message/rfc822":
                inner = child.get_payload(0)
                assert isinstance(inner, Message)
                content = inner.as_bytes()
            name = _REPORT_PART_NAMES.get(ctype, f"report-part-{i + 1}.txt")
            self.attachments.append(Attachment(name, ctype, content))

    def _body(self, part: Message, ctype: str) -> None:
        attr = "text" if ctype == "text/plain" else "html"
        if getattr(self, attr) is not None:
            raise NotRepresentable(f"more than one {ctype} body part")
        if isinstance(part, SlicedPart):
            raw = _raw_body(part, part.source, part.body_start, part.body_end)
            if raw is not None:
                setattr(self, attr, raw)
                return
            part.load_payload()
        try:
            content = part.get_content()  # type: ignore[attr-defined]
        except LookupError as exc:
            raise NotRepresentable(f"{ctype} body in an unknown charset: {exc}") from None
        # Line ends as in a JSON document; the provider writes CRLF when it rebuilds MIME.
        setattr(self, attr, Body(str(content).replace("\r\n", "\n")))

    def _attachment(
        self, part: Message, ctype: str, disposition: str | None, filename: str | None, parent: str
    ) -> None:
        encoded: list[bytes] | None = None
        content: bytes | None = None
        if ctype == "message/rfc822":
            inner = part.get_payload(0)
            assert isinstance(inner, Message)
            content = inner.as_bytes()
        elif str(part.get("content-transfer-encoding", "")).strip().lower() == "base64":
            encoded = _canonical_base64_of(part)
        if content is None and encoded is None:
            if isinstance(part, SlicedPart):
                part.load_payload()
            raw = part.get_payload(decode=True)
            content = raw if isinstance(raw, bytes) else b""
        cid = str(part.get("Content-ID", "")).strip().strip("<>") or None
        inline = cid is not None and (
            disposition == "inline" or (disposition is None and parent == "multipart/related")
        )
        if not filename:
            # Both providers require a name; the recipient's client would show none anyway.
            ext = mimetypes.guess_extension(ctype) or ".bin"
            filename = f"{'inline' if inline else 'attachment'}-{len(self.attachments) + 1}{ext}"
        self.attachments.append(
            Attachment(
                _text(filename), ctype, content, cid if inline else None, base64_chunks=encoded
            )
        )


def _canonical_base64_of(part: Message) -> list[bytes] | None:
    """A base64 part's content as a provider wants it (one line, canonical), to be passed
    on without being decoded and encoded again; None if it is not in that form."""
    if isinstance(part, SlicedPart):
        return canonical_base64(part.source, part.body_start, part.body_end)
    payload = part.get_payload()
    if not (isinstance(payload, str) and payload.isascii()):
        return None
    raw = payload.encode("ascii")
    return canonical_base64(raw, 0, len(raw))


def _is_delivery_report(part: Message) -> bool:
    return str(part.get_param("report-type", "")).lower() == "delivery-status"


def _custom_headers(data: bytes) -> list[tuple[str, str]]:
    """Headers to pass on, unfolded, in wire form (encoded words stay encoded)."""
    blank = HEADER_END.search(data)  # not re.split: that would copy the whole body too
    head = data if blank is None else data[: blank.start()]
    out: list[tuple[str, str]] = []
    for line in re.sub(rb"\r?\n(?=[ \t])", b"", head).splitlines():
        name, sep, value = line.decode("utf-8", "replace").partition(":")
        name = name.strip()
        if not sep or not name or name.lower() in DROPPED_HEADERS:
            continue
        value = value.strip()
        if not value.isascii():
            # Raw UTF-8 (SMTPUTF8): providers want header values already encoded.
            value = Header(value, "utf-8").encode().replace("\n", "")
        out.append((name, value))
    return out


class JsonUpstream(HTTPUpstream):
    """A provider that takes a JSON document built from the converted message, not MIME
    (SendGrid, Postmark): it skips what `convert` can't carry faithfully, and posts
    `payload(message)` to `path` with the provider's `auth_headers`."""

    wants_dkim = False  # these providers rebuild the message and sign it themselves
    path: ClassVar[str]

    @abc.abstractmethod
    def auth_headers(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def payload(self, msg: JsonMessage) -> dict[str, Any]:
        """The provider's document; large strings (bodies, attachments) as `Escaped`
        values, which `serialise` splices in already escaped (`jsonwire.plain` turns them
        back into strings for a reader that wants the plain document)."""

    def refusal(self, envelope: Envelope, data: bytes) -> str | None:
        return super().refusal(envelope, data) or unrepresentable_reason(envelope, data)

    def build(self, envelope: Envelope, data: bytes) -> Request:
        body = serialise(self.payload(convert(envelope, data)))
        return Request(self.path, body, "application/json", self.auth_headers())
