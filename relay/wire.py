"""SMTP's DATA wire format (RFC 5321 4.5.2): line ends and dot-stuffing.

One place for what the SMTP listener checks when it reads a message and what the smtp
upstream and the inbound LMTP destination write: whole-message byte scans are a large part
of the CPU a 100 KB message costs, so each is done once, with bytes methods (aiosmtplib's
own data() made two regex passes over every message). It sits at the top level, not in
`smtp/` (the listener), because the upstreams and inbound use it too and should not import
the listener's package for it.
"""

from __future__ import annotations

import re

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


def crlf_only(data: bytes) -> bool:
    """Every line ends in CRLF: no bare CR, no bare LF."""
    lf = data.count(b"\n")
    return lf == data.count(b"\r\n") == data.count(b"\r")


def dot_stuff(data: bytes, *, crlf_checked: bool = False) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, and the final "." line.

    `crlf_checked`: the caller knows every line already ends in CRLF (the listener refuses
    anything else), which spares the scan for bare CR and LF.
    """
    if not (crlf_checked or crlf_only(data)):
        data = _LINE_ENDS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"
