"""SMTP's DATA wire format (RFC 5321 4.5.2): line ends and dot-stuffing.

One place for what the SMTP listener checks when it reads a message and what the smtp
upstream and the inbound LMTP destination write: whole-message byte scans are a large part
of the CPU a 100 KB message costs, so each is done once. `relay._wirescan` (C, built by
`make` next to this file) does each in one pass a line at a time with memchr; when it was
not built (no C compiler) the same functions run here on bytes methods, several passes of
about a nanosecond a byte. `SCANNER` says which one runs. It sits at the top level, not in
`smtp/` (the listener), because the upstreams and inbound use it too.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")

Buffer = bytes | bytearray


def _crlf_only(data: Buffer) -> bool:
    """Every line ends in CRLF: no bare CR, no bare LF."""
    lf = data.count(b"\n")
    return lf == data.count(b"\r\n") == data.count(b"\r")


def _unstuff(buffer: Buffer, start: int, end: int) -> bytes | None:
    """`buffer[start:end]` with the dot of every CRLF "." removed (a copy), or None when it
    holds a bare CR or LF. The listener's blocks begin at a line's CRLF, so every line in
    one is checked, the first included."""
    block = bytes(memoryview(buffer)[start:end])
    if not _crlf_only(block):
        return None
    # Looking first is half the cost of replacing, and most messages have no such line.
    return block.replace(b"\r\n.", b"\r\n") if b"\r\n." in block else block


def _find_end(buffer: Buffer, start: int) -> int:
    """Where the end of DATA (CRLF "." CRLF) begins in `buffer[start:]`, or -1."""
    return buffer.find(b"\r\n.\r\n", start)


def _stuff(data: bytes) -> bytes:
    """The DATA payload of data whose lines all end in CRLF."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"


try:
    from relay import _wirescan
except ImportError:  # not built: the same answers, slower
    SCANNER = "python"
    crlf_only: Callable[[Buffer], bool] = _crlf_only
    unstuff: Callable[[Buffer, int, int], bytes | None] = _unstuff
    find_end: Callable[[Buffer, int], int] = _find_end
    _stuff_crlf: Callable[[bytes], bytes] = _stuff
else:
    SCANNER = "c"
    crlf_only = _wirescan.crlf_only
    unstuff = _wirescan.unstuff
    find_end = _wirescan.find_end
    _stuff_crlf = _wirescan.stuff


def dot_stuff(data: bytes, *, crlf_checked: bool = False) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, and the final "." line.

    `crlf_checked`: the caller knows every line already ends in CRLF (the listener refuses
    anything else), which spares the scan for bare CR and LF.
    """
    if not (crlf_checked or crlf_only(data)):
        data = _LINE_ENDS.sub(b"\r\n", data)
    return _stuff_crlf(data)
