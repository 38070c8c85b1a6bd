"""JSON request bodies that carry a message's text without building it as one Python string.

A provider's JSON document is small except for one to a few large strings (a text body, an
attachment's base64, a whole RFC 822 message). `json.dumps` of the document turned those
into a decoded `str`, an escaped `str` and then `bytes`: three copies of a 5 MB scan
beside the queued bytes, and most of the CPU of an HTTP hand-off at 100 KB. Here the small
part is still serialised by `json.dumps`, and each large string goes in as a list of
already escaped byte chunks, made window by window from the queued bytes: the request is
those chunks (sent one after another, never joined), so a message is held about twice
(the queued bytes and the request), and the output is byte for byte what `json.dumps` of
the decoded text would have been.
"""

from __future__ import annotations

import binascii
import codecs
import json
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

#: Bytes of a window; windows end after a LF, so a CRLF or a UTF-8 sequence is never cut.
WINDOW = 64 * 1024

# Printable ASCII that JSON carries as it is (ensure_ascii: everything else is escaped).
_PLAIN = bytes(b for b in range(0x20, 0x7F) if b not in b'"\\')
_PLAIN_AND_LINES = _PLAIN + b"\r\n"
_SIMPLE_ESCAPES = ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"\t", b"\\t"))
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# Charsets that decode ASCII as ASCII, byte by byte, and in which a LF byte is always a
# line end: a window that is pure ASCII needs no decoding at all in them.
_ASCII_COMPATIBLE = frozenset(
    {"ascii", "utf-8"}
    | {f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)}
    | {f"cp{n}" for n in range(1250, 1259)}
    | {"latin-1", "koi8-r", "koi8-u"}
)


def ascii_compatible(charset: str) -> str | None:
    """The codec name for `charset` when windows of it can be escaped without decoding
    their ASCII, else None (unknown, stateful or multi-byte charsets go the slow way)."""
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return None
    return name if name in _ASCII_COMPATIBLE else None


def _windows(data: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Slices of data[start:end] of about WINDOW bytes, each ending after a LF (or at end)."""
    while start < end:
        cut = start + WINDOW
        if cut >= end:
            cut = end
        else:
            lf = data.find(b"\n", cut, end)
            cut = end if lf < 0 else lf + 1
        yield start, cut
        start = cut


def is_utf8(data: bytes) -> bool:
    """Whether data is valid UTF-8, decoding a window at a time (a 5 MB message with one
    accented letter would otherwise become a 10 MB str just to be checked)."""
    if data.isascii():
        return True
    try:
        for lo, hi in _windows(data, 0, len(data)):
            window = data[lo:hi]
            if not window.isascii():
                window.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def escaped_text(data: bytes, start: int, end: int, *, codec: str, crlf_to_lf: bool) -> list[bytes]:
    """data[start:end] decoded with `codec` (errors replaced), CRLF made LF if asked, as
    JSON string content (no quotes) in chunks: what json.dumps of that text writes."""
    chunks = []
    for lo, hi in _windows(data, start, end):
        window = data[lo:hi]
        rest = window.translate(None, _PLAIN_AND_LINES)
        if rest and rest.translate(None, b'"\\\t'):
            # Control characters or 8-bit text: the json module's own escaper.
            text = window.decode(codec, "replace")
            if crlf_to_lf:
                text = text.replace("\r\n", "\n")
            chunks.append(encode_basestring_ascii(text)[1:-1].encode("ascii"))
            continue
        for raw, escape in _SIMPLE_ESCAPES:
            if raw in rest:
                window = window.replace(raw, escape)
        window = window.replace(b"\r\n", b"\\n" if crlf_to_lf else b"\\r\\n")
        if b"\r" in window:
            window = window.replace(b"\r", b"\\r")
        if b"\n" in window:
            window = window.replace(b"\n", b"\\n")
        chunks.append(window)
    return chunks


def canonical_base64(data: bytes, start: int, end: int) -> list[bytes] | None:
    """The base64 text in data[start:end] without its line breaks, in chunks, if it is
    exactly what base64.b64encode of its decoded bytes gives (so it can go to a provider
    as it is, not decoded and encoded again); None if anything else is in it.

    Every CR and LF goes, paired or not: the email package decodes base64 after joining
    its lines (bytes.splitlines: CRLF, CR and LF), so that is the text it decodes. Two
    deleting translates are about 2 ns a byte, replace() and one translate were 3.4."""
    chunks = []
    for lo, hi in _windows(data, start, end):
        window = data[lo:hi].translate(None, b"\r\n")
        if window.translate(None, _BASE64_ALPHABET) and (
            hi != end or window.rstrip(b"=").translate(None, _BASE64_ALPHABET)
        ):
            return None  # other characters, or padding before the end
        if window:
            chunks.append(window)
    total = sum(len(c) for c in chunks)
    if total % 4:
        return None
    tail = b""
    for chunk in reversed(chunks):
        tail = chunk[-4:] + tail
        if len(tail) >= 4:
            break
    quantum = tail[-4:]
    # At most two '=' and only at the very end (checked above), and no stray bits in the
    # last quantum: decoding and encoding it gives it back.
    try:
        again = binascii.b2a_base64(binascii.a2b_base64(quantum), newline=False)
    except binascii.Error:
        return None
    return chunks if again == quantum else None


@dataclass(frozen=True, slots=True)
class Escaped:
    """A JSON string given as escaped content chunks (the quotes are added around them)."""

    chunks: Sequence[bytes]

    @classmethod
    def of(cls, text: str) -> Escaped:
        return cls((encode_basestring_ascii(text)[1:-1].encode("ascii"),))

    def text(self) -> str:
        """The string itself (for tests and the few readers that want a dict)."""
        decoded: str = json.loads(b'"' + b"".join(self.chunks) + b'"')
        return decoded


# A placeholder no message can contain: a random token made per process.
_SLOT = "\x00" + secrets.token_hex(16) + "-"


def serialise(document: dict[str, Any]) -> list[bytes]:
    """json.dumps(document) as chunks of bytes, with each Escaped value spliced in."""
    escaped: list[Escaped] = []

    def place(value: Any) -> Any:
        if isinstance(value, Escaped):
            escaped.append(value)
            return f"{_SLOT}{len(escaped) - 1}\x00"
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        if isinstance(value, list):
            return [place(v) for v in value]
        return value

    small = json.dumps(place(document)).encode("ascii")
    if not escaped:
        return [small]
    out: list[bytes] = []
    pos = 0
    for i, value in enumerate(escaped):
        marker = json.dumps(f"{_SLOT}{i}\x00").encode("ascii")[1:-1]
        at = small.find(marker, pos)
        assert at >= 0 and small.find(marker, at + 1) < 0, "placeholder not found once"
        out.append(small[pos:at])
        out.extend(value.chunks)
        pos = at + len(marker)
    out.append(small[pos:])
    return out


def plain(document: Any) -> Any:
    """The document with every Escaped value as the string it stands for."""
    if isinstance(document, Escaped):
        return document.text()
    if isinstance(document, dict):
        return {k: plain(v) for k, v in document.items()}
    if isinstance(document, list):
        return [plain(v) for v in document]
    return document
