"""Multipart messages split on the queued bytes, the way the email package would split them.

The email package's parser reads a message line by line, makes a Python string of every
line and joins each part's lines again: for a 5 MB scan (a line of text and a base64 PDF)
that was about 140 ms and nine times the message in memory on the way to a JSON
provider. Here only the header blocks go through the email package (they are small);
delimiter lines are found with `bytes.find` of "-" (memchr, and base64 has no "-"), and
each leaf part is left where it is in the queued bytes, as positions, for the conversion
to read without copying it.

The result is the tree the full parser builds, with each leaf's payload not yet loaded:
the same parts with the same headers, and each payload the bytes the parser would have
given it (the lines between its header block and the next delimiter line, less the line
end that RFC 2046 5.1.1 gives to the delimiter). A multipart's body is cut at its own
delimiter lines first and its parts are read within those cuts; the parser agrees, as it
checks every line against the delimiters of all enclosing multiparts, and a line that is
an enclosing one's ends the inner multipart unclosed, which is refused below. `split`
answers False for everything it does not read exactly as the parser does, and the caller
parses the whole message instead:

- a line end other than CRLF anywhere (the parser also ends lines at a bare CR or LF);
- multipart types other than mixed, alternative and related (signed, encrypted, report
  and digest have meanings or defaults of their own), message/* parts, nesting deeper
  than MAX_DEPTH;
- a boundary that is not ASCII or longer than RFC 2046's 70 characters;
- any defect the parser reports in a header block, a part without a blank line after its
  headers, no opening or no closing delimiter, two delimiter lines in a row (the parser
  skips the second).
"""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import Policy
from itertools import pairwise
from typing import Any

from relay.wire import crlf_only

#: Multipart types whose children are read here (their default child type is text/plain).
CONTAINERS = frozenset({"multipart/mixed", "multipart/alternative", "multipart/related"})
#: Multiparts within multiparts read here; deeper ones go to the full parser.
MAX_DEPTH = 6
#: RFC 2046 5.1.1: a boundary is 1 to 70 characters.
_MAX_BOUNDARY = 70

# What may follow "--" + boundary on a delimiter line: "--" for the close delimiter, then
# transport padding, then the line end (or the end of the message).
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\Z)")


class ParsedHeaders(EmailMessage):
    """A message or part that keeps each header field it has parsed: with the default
    policy every `get` (and so every get_content_type, get_param, get_filename...)
    parses the field again through the header registry, about 80 us for a Content-Type,
    and a conversion asks for the same few fields a dozen times per part. Kept by
    (name, raw value), so a changed field is parsed anew."""

    def __init__(self, policy: Policy | None = None) -> None:
        super().__init__(policy)
        self._parsed_fields: dict[tuple[str, Any], Any] = {}

    def get(self, name: str, failobj: Any = None) -> Any:
        wanted = name.lower()
        for field, value in self.raw_items():
            if field.lower() == wanted:
                key = (field, value)
                parsed = self._parsed_fields.get(key)
                if parsed is None:
                    parsed = self.policy.header_fetch_parse(field, value)
                    self._parsed_fields[key] = parsed
                return parsed
        return failobj


class SlicedPart(ParsedHeaders):
    """A part as the full parser would build it, except that a leaf's payload is still in
    the queued bytes: `source[body_start:body_end]`, loaded by `load_payload` only when
    the conversion needs the email package to decode it."""

    source: bytes = b""
    body_start: int = 0
    body_end: int = 0

    def load_payload(self) -> None:
        """Set the payload as the parser would have: the bytes as surrogate-escaped text."""
        raw = self.source[self.body_start : self.body_end]
        self.set_payload(raw.decode("ascii", "surrogateescape"))


_MESSAGE_PARSER = BytesParser(ParsedHeaders, policy=policy.default)
_PART_PARSER = BytesParser(SlicedPart, policy=policy.default)


def parse_headers(block: bytes) -> ParsedHeaders:
    """A message's header block (ending in its blank line) as the email package reads it."""
    message = _MESSAGE_PARSER.parsebytes(block, headersonly=True)
    assert isinstance(message, ParsedHeaders)
    return message


def split(data: bytes, message: EmailMessage, body_start: int, *, crlf_checked: bool) -> bool:
    """Give `message` (a multipart whose header block, data[:body_start], was parsed on
    its own) its parts read from data[body_start:], as SlicedParts; False, and the
    message left as it was, when the parser might read it differently (module docstring).

    `crlf_checked`: the caller knows every line of data ends in CRLF (the SMTP listener
    refuses anything else), which spares a scan of the whole message.
    """
    if message.get_content_type() not in CONTAINERS or message.defects:
        return False
    if not (crlf_checked or crlf_only(data)):
        return False
    children = _children(data, message, body_start, len(data), 1)
    if children is None:
        return False
    message.set_payload(children)
    return True


def _children(
    data: bytes, container: EmailMessage, start: int, end: int, depth: int
) -> list[Message | str] | None:
    """The parts of `container`, whose body is data[start:end] (whole lines)."""
    boundary = container.get_boundary()
    if boundary is None or not boundary.isascii() or not 0 < len(boundary) <= _MAX_BOUNDARY:
        return None
    delimiter = b"--" + boundary.encode("ascii")
    lines = _delimiter_lines(data, delimiter, start, end)
    if len(lines) < 2 or lines[0][2] or not lines[-1][2]:
        return None  # no opening delimiter (the first one closes), or no closing one
    parts: list[Message | str] = []
    for (_, part_start, _), (part_end, _, _) in pairwise(lines):
        if part_start == part_end:
            return None  # two delimiter lines in a row: the parser skips the second
        part = _part(data, part_start, part_end, depth)
        if part is None:
            return None
        parts.append(part)
    return parts


def _delimiter_lines(
    data: bytes, delimiter: bytes, start: int, end: int
) -> list[tuple[int, int, bool]]:
    """(line start, next line's start, closes) of each delimiter line in data[start:end],
    up to and including the first close delimiter. Only lines that begin with "-" are
    looked at; in base64 there are none, so a PDF is crossed by memchr alone."""
    found: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end:
        dash = data.find(b"-", pos, end)
        if dash < 0:
            break
        at_line_start = dash == start or data[dash - 1] == 0x0A
        if at_line_start and data.startswith(delimiter, dash, end):
            tail = _DELIMITER_TAIL.match(data, dash + len(delimiter), end)
            if tail is not None:
                closes = tail.group(1) is not None
                found.append((dash, tail.end(), closes))
                if closes:
                    break
                pos = tail.end()
                continue
        newline = data.find(b"\n", dash, end)
        pos = end if newline < 0 else newline + 1
    return found


def _part(data: bytes, start: int, end: int, depth: int) -> SlicedPart | None:
    """The part in data[start:end]: its lines up to, and including, the line end that
    belongs to the next delimiter."""
    if data.startswith(b"\r\n", start):
        head_end = start + 2  # no header fields at all
    else:
        blank = data.find(b"\r\n\r\n", start, end)
        if blank < 0:
            return None
        head_end = blank + 4
    part = _PART_PARSER.parsebytes(data[start:head_end], headersonly=True)
    assert isinstance(part, SlicedPart)
    if part.defects or part.get_payload() != "":
        return None
    maintype = part.get_content_maintype()
    if maintype == "multipart":
        if part.get_content_type() not in CONTAINERS or depth >= MAX_DEPTH:
            return None
        children = _children(data, part, head_end, end, depth + 1)
        if children is None:
            return None
        part.set_payload(children)
        return part
    if maintype == "message":
        return None  # message/rfc822 and friends are parsed as messages of their own
    part.source = data
    part.body_start = head_end
    part.body_end = max(head_end, end - 2)
    return part
