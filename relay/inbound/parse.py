"""Split a received MIME message into the parts destinations need.

Webhooks want JSON fields and attachment bytes; the directory destination wants
attachments as files; routing may need the header recipients when a notification carried
none. Parsing uses the stdlib `email` package with `policy.default` (RFC 5322/6532 header
decoding), and never raises on malformed mail: what can't be decoded is kept as bytes or
decoded with replacement characters, because a scanner's odd MIME must still be delivered.

Attachment names come from the sender, so they are untrusted: `safe_filename()` turns any
name into one that is a single path component on POSIX and Windows alike.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any, Final

log = logging.getLogger("relay.inbound")

#: Windows device names: `CON.pdf` opens the console there, whatever the extension.
_RESERVED: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
    | {f"COM{c}" for c in "¹²³"}
    | {f"LPT{c}" for c in "¹²³"}
)
_UNSAFE_CHARS: Final = re.compile(r'[<>:"/\\|?*]')
#: Bytes, not characters: file systems limit the encoded name (ext4, XFS: 255 bytes).
MAX_FILENAME_BYTES: Final = 255

_EXTENSIONS: Final = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "application/pdf": ".pdf",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/tiff": ".tif",
    "message/rfc822": ".eml",
}


def safe_filename(
    name: str | None, *, default: str = "attachment", max_bytes: int = MAX_FILENAME_BYTES
) -> str:
    """A name safe to create in a directory: one component, printable, not reserved.

    - only the last path component survives (`../../etc/passwd` -> `passwd`, and `\\` is a
      separator too, for names written on Windows);
    - control and format characters (including bidi overrides that disguise `.exe`) and
      the characters Windows forbids become `_`;
    - leading dots and spaces go (no hidden files, no `..`), as do trailing dots and
      spaces (Windows strips them, which would alias two names);
    - Windows device names (`CON`, `nul.txt`, `COM1`) get a `_` prefix;
    - the name is cut to `max_bytes` of UTF-8, keeping a short extension;
    - an empty result becomes `default`.
    """
    text = unicodedata.normalize("NFC", name or "")
    text = re.split(r"[/\\]", text)[-1]
    text = "".join(
        "_" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text
    )
    text = _UNSAFE_CHARS.sub("_", text)
    text = text.strip(" .").strip()
    if not text or set(text) <= {"_"}:
        text = default
    stem = text.split(".", 1)[0]
    if stem.upper() in _RESERVED:
        text = "_" + text
    if len(text.encode("utf-8")) > max_bytes:
        base, dot, ext = text.rpartition(".")
        ext = f".{ext}" if dot and base and 0 < len(ext.encode("utf-8")) <= 16 else ""
        base = text[: len(text) - len(ext)] if ext else text
        budget = max_bytes - len(ext.encode("utf-8"))
        base = base.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip(" .")
        text = (base or default) + ext
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """One attachment. `filename` is already safe; `original_filename` is as sent."""

    filename: str
    content_type: str
    data: bytes
    original_filename: str | None = None
    content_id: str | None = None
    inline: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (no bytes): what a webhook's JSON part lists."""
        return {
            "filename": self.filename,
            "original_filename": self.original_filename,
            "content_type": self.content_type,
            "size": len(self.data),
            "sha256": self.sha256,
            "content_id": self.content_id,
            "inline": self.inline,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedMessage:
    """The fields of a message that destinations use."""

    subject: str
    from_: tuple[str, ...]
    to: tuple[str, ...]
    cc: tuple[str, ...]
    reply_to: tuple[str, ...]
    message_id: str | None
    date: str | None
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    defects: tuple[str, ...] = ()

    @property
    def sender(self) -> str | None:
        return self.from_[0] if self.from_ else None

    def header_recipients(self) -> tuple[str, ...]:
        """To and Cc addresses: only for routing when the envelope gave none."""
        seen: dict[str, None] = {}
        for addr in (*self.to, *self.cc):
            seen.setdefault(addr, None)
        return tuple(seen)

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "from": list(self.from_),
            "to": list(self.to),
            "cc": list(self.cc),
            "reply_to": list(self.reply_to),
            "message_id": self.message_id,
            "date": self.date,
            "text": self.text,
            "html": self.html,
            "attachments": [a.describe() for a in self.attachments],
        }


def _header(msg: MIMEPart, name: str) -> str | None:
    try:
        value = msg.get(name)
    except Exception:  # a header the policy can't parse is just absent
        return None
    return None if value is None else str(value)


def _addresses(msg: EmailMessage, name: str) -> tuple[str, ...]:
    try:
        values = msg.get_all(name) or []
        pairs = getaddresses([str(v) for v in values])
    except Exception:  # malformed address headers must not stop delivery
        return ()
    return tuple(addr for _, addr in pairs if addr and "@" in addr)


def _text_of(part: MIMEPart) -> str:
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except (LookupError, ValueError, AssertionError):  # unknown charset, bad encoding
        pass
    payload = part.get_payload(decode=True)
    raw = payload if isinstance(payload, bytes) else b""
    charset = part.get_content_charset()
    return raw.decode(charset if charset and _known_charset(charset) else "utf-8", "replace")


def _known_charset(name: str | None) -> bool:
    """Whether Python has a codec for `name`: mail in made-up charsets still gets read."""
    if not name:
        return False
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _bytes_of(part: MIMEPart) -> bytes:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            # the attached message itself, as an .eml file
            return bytes(inner[0].as_bytes(policy=policy.default.clone(linesep="\r\n")))
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _leaves(part: MIMEPart) -> list[MIMEPart]:
    """Leaf parts in order; an attached message (message/rfc822) counts as one leaf."""
    if part.get_content_type() == "message/rfc822" or not part.is_multipart():
        return [part]
    out: list[MIMEPart] = []
    for sub in part.iter_parts():
        out.extend(_leaves(sub))
    return out


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse raw RFC 5322 bytes. Never raises for malformed content."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    text_part = html_part = None
    try:
        text_part = msg.get_body(preferencelist=("plain",))
        html_part = msg.get_body(preferencelist=("html",))
    except Exception:  # odd structure: no body; every leaf is an attachment
        log.debug("no body found in message", exc_info=True)
    body_ids = {id(p) for p in (text_part, html_part) if p is not None}

    attachments: list[Attachment] = []
    for n, part in enumerate(_leaves(msg), start=1):
        if id(part) in body_ids:
            continue
        ctype = part.get_content_type()
        disposition = part.get_content_disposition()
        try:
            original = part.get_filename()
        except Exception:  # an undecodable filename parameter
            original = None
        if original is None and disposition != "attachment" and ctype.startswith("text/"):
            continue  # a second body-like text part (a list footer), not a file
        default = f"part-{n}{_EXTENSIONS.get(ctype, '.bin')}"
        cid = _header(part, "Content-ID")
        attachments.append(
            Attachment(
                filename=safe_filename(original, default=default),
                content_type=ctype,
                data=_bytes_of(part),
                original_filename=original,
                content_id=cid.strip("<> ") if cid else None,
                inline=disposition == "inline",
            )
        )

    return ParsedMessage(
        subject=_header(msg, "Subject") or "",
        from_=_addresses(msg, "From"),
        to=_addresses(msg, "To"),
        cc=_addresses(msg, "Cc"),
        reply_to=_addresses(msg, "Reply-To"),
        message_id=_header(msg, "Message-ID"),
        date=_header(msg, "Date"),
        text=_text_of(text_part) if text_part is not None else None,
        html=_text_of(html_part) if html_part is not None else None,
        attachments=tuple(attachments),
        defects=tuple(type(d).__name__ for d in msg.defects),
    )
