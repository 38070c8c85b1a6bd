"""Delivery status notifications (RFC 3464): telling the sender that mail failed or is late.

A DSN is `multipart/report; report-type=delivery-status` (RFC 6522) with three parts: a
text a person can act on, a machine-readable `message/delivery-status` (one block for the
message, one per recipient), and the original header as `text/rfc822-headers` (the body is
left out: it may be large, and the sender has it).

Bounces must never cause bounces. A DSN goes out with the null reverse-path (RFC 5321
section 4.5.5), so a failure to deliver it is dropped rather than answered, and
`should_bounce` refuses to answer null-sender and automatic mail (RFC 3834).

The message is assembled by hand rather than with `email.message`: the email package's
generator wants `message/delivery-status` payloads as parsed header blocks and re-folds
fields, and here every byte of the report is meant to be exactly as written.
"""

from __future__ import annotations

import quopri
import re
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate, make_msgid
from typing import Literal

from relay.message import Envelope

CRLF = "\r\n"
DSNKind = Literal["failed", "delayed"]

# RFC 3463 enhanced status code, and an RFC 5321 reply code at the start of a reply text.
_ENHANCED_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# A reply code counts when the reason starts with it, or when an enhanced code follows it:
# "HTTP 401" or "SES 400" in an API error must not be reported as an SMTP reply.
_SMTP_REPLY_RE = re.compile(r"^\s*[245][0-5]\d(?:[ -]|$)|(?<![\d.])[245][0-5]\d[ -](?=[245]\.\d)")
_DEFAULT_STATUS: dict[str, str] = {"failed": "5.0.0", "delayed": "4.0.0"}
_CLASS_FOR_KIND: dict[str, str] = {"failed": "5", "delayed": "4"}


def status_code(reason: str, kind: DSNKind = "failed") -> str:
    """The RFC 3463 code for the report: the first of the right class in `reason`, or X.0.0.

    A failed recipient is reported with a 5.x.x code and a delayed one with 4.x.x, so a
    4.x.x seen while retrying is not reported as if it were final, and vice versa.
    """
    want = _CLASS_FOR_KIND[kind]
    for match in _ENHANCED_RE.finditer(reason):
        if match.group(1) == want:
            return ".".join(match.groups())
    return _DEFAULT_STATUS[kind]


def diagnostic_code(reason: str) -> str | None:
    """`smtp; <reply>` when the reason quotes an SMTP reply (e.g. "550 5.1.1 No such user")."""
    match = _SMTP_REPLY_RE.search(reason)
    if match is None:
        return None
    return "smtp; " + _one_line(reason[match.start() :].strip())


def _one_line(text: str, limit: int = 900) -> str:
    """ASCII, no line breaks: safe to put in a header field (no header injection)."""
    flat = " ".join(text.split())
    flat = flat.encode("ascii", errors="replace").decode("ascii")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _address_field(address: str) -> str:
    """`rfc822; addr`, or `utf-8; addr` with \\x{HEX} escapes for SMTPUTF8 addresses (RFC 6533)."""
    address = _one_line(address) if address.isascii() else address
    if address.isascii():
        return f"rfc822; {address}"
    escaped = "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in address
    )
    return f"utf-8; {escaped}"


def _header_section(original: bytes) -> bytes:
    match = re.search(rb"\r?\n\r?\n", original)
    head = original if match is None else original[: match.start()]
    # Normalise to CRLF, so the part is uniform with the rest of the report.
    return b"\r\n".join(re.split(rb"\r?\n", head)) + b"\r\n"


def _header_fields(original: bytes) -> dict[str, str]:
    """Lower-cased name → unfolded value of its first occurrence (enough for loop checks)."""
    fields: dict[str, str] = {}
    name: str | None = None  # the field being continued, if it is a first occurrence
    for raw in re.split(rb"\r?\n", _header_section(original).rstrip(b"\r\n")):
        line = raw.decode("utf-8", errors="replace")
        if line[:1] in (" ", "\t"):
            if name is not None:
                fields[name] += " " + line.strip()
            continue
        key, colon, value = line.partition(":")
        name = key.strip().lower() if colon else None
        if name is not None:
            if name in fields:
                name = None
            else:
                fields[name] = value.strip()
    return fields


def should_bounce(envelope: Envelope, data: bytes) -> bool:
    """Whether a failure of this message may be reported to its sender.

    Never for the null sender (it is a bounce already: RFC 5321 section 4.5.5), never to
    MAILER-DAEMON, and never for automatic mail (Auto-Submitted other than "no", RFC 3834)
    or a report (multipart/report: a DSN, an MDN, a feedback report): two systems bouncing
    each other's bounces is a loop that floods both.
    """
    if not envelope.mail_from.strip("<> "):
        return False
    local = envelope.mail_from.rpartition("@")[0].strip("<> ").lower()
    if local == "mailer-daemon":
        return False
    fields = _header_fields(data)
    auto = fields.get("auto-submitted", "").split(";")[0].strip().lower()
    if auto and auto != "no":
        return False
    content_type = fields.get("content-type", "").lower()
    return not (
        content_type.startswith("multipart/report")
        or content_type.startswith("message/delivery-status")
    )


def dsn_envelope(original: Envelope) -> Envelope:
    """The envelope a DSN travels in: null sender, to the original message's sender."""
    return Envelope("", (original.mail_from,), smtputf8=not original.mail_from.isascii())


def _human_text(
    *,
    kind: DSNKind,
    envelope: Envelope,
    failed: Mapping[str, str],
    reporting_mta: str,
    queue_id: str,
    arrival: float,
    will_retry_until: float | None,
) -> str:
    when = format_datetime(datetime.fromtimestamp(arrival, UTC))
    lines = [f"This is the mail system at {reporting_mta}.", ""]
    if kind == "failed":
        lines += [
            "Your message could not be delivered to one or more recipients. It will not",
            "be retried. The reasons given by the receiving systems are below.",
            "",
            "What you can do: check the recipient addresses for typing mistakes; if a",
            "reason mentions a full mailbox or a temporary problem, send the message",
            "again later; otherwise contact the recipient another way, or forward this",
            "report to your mail administrator and quote the queue id below.",
        ]
    else:
        until = (
            ""
            if will_retry_until is None
            else " until " + format_datetime(datetime.fromtimestamp(will_retry_until, UTC))
        )
        lines += [
            "Delivery of your message to the recipients below is delayed. The mail system",
            f"will keep trying{until}; you do not need to send it again. You will be",
            "told if it finally fails.",
        ]
    lines += [
        "",
        f"Queue id: {queue_id}",
        f"Received: {when}",
        f"Sender: <{envelope.mail_from}>",
        "",
    ]
    for rcpt, reason in failed.items():
        lines.append(f"<{rcpt}>:")
        lines.append(f"    {' '.join(reason.split()) or 'no reason given'}")
        lines.append("")
    return "\n".join(lines)


def _per_recipient(rcpt: str, reason: str, kind: DSNKind, now: float) -> list[str]:
    fields = [
        f"Final-Recipient: {_address_field(rcpt)}",
        f"Action: {kind}",
        f"Status: {status_code(reason, kind)}",
    ]
    diagnostic = diagnostic_code(reason)
    if diagnostic is not None:
        fields.append(f"Diagnostic-Code: {diagnostic}")
    elif reason.strip():
        # No SMTP reply to quote (an HTTP API said no): keep the words as an X- field.
        fields.append(f"X-Relay-Reason: {_one_line(reason)}")
    fields.append(f"Last-Attempt-Date: {formatdate(now)}")
    return fields


def build_dsn(
    *,
    original: bytes,
    envelope: Envelope,
    failed: Mapping[str, str],
    reporting_mta: str,
    queue_id: str,
    arrival: float,
    kind: DSNKind = "failed",
    will_retry_until: float | None = None,
    now: float | None = None,
) -> bytes:
    """Build the report for the recipients in `failed` (address → reason operators read).

    Send it with `dsn_envelope(envelope)` (null sender). `now` is injectable for tests.
    """
    if kind not in _DEFAULT_STATUS:
        raise ValueError(f"kind must be 'failed' or 'delayed', got {kind!r}")
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    now = time.time() if now is None else now
    mta = _one_line(reporting_mta) or "localhost"
    boundary = f"=_relay_{queue_id}_{secrets.token_hex(8)}"
    subject = (
        "Undelivered Mail Returned to Sender"
        if kind == "failed"
        else "Delayed Mail (still being retried)"
    )
    to = "".join(envelope.mail_from.split())  # no whitespace, so no header injection

    text = _human_text(
        kind=kind,
        envelope=envelope,
        failed=failed,
        reporting_mta=mta,
        queue_id=queue_id,
        arrival=arrival,
        will_retry_until=will_retry_until,
    )
    text_crlf = text.replace("\n", CRLF) + CRLF
    if text.isascii():
        text_cte, text_body = "7bit", text_crlf.encode("ascii")
    else:
        text_cte = "quoted-printable"
        text_body = quopri.encodestring(text_crlf.encode("utf-8"))
        text_body = b"\r\n".join(text_body.splitlines()) + b"\r\n"

    status_lines = [
        f"Reporting-MTA: dns; {mta}",
        f"X-Relay-Queue-ID: {_one_line(queue_id)}",
        f"Arrival-Date: {formatdate(arrival)}",
    ]
    if kind == "delayed" and will_retry_until is not None:
        status_lines.append(f"X-Relay-Will-Retry-Until: {formatdate(will_retry_until)}")
    for rcpt, reason in failed.items():
        status_lines.append("")
        status_lines += _per_recipient(rcpt, reason, kind, now)
        if kind == "delayed" and will_retry_until is not None:
            status_lines.append(f"Will-Retry-Until: {formatdate(will_retry_until)}")
    status_body = (CRLF.join(status_lines) + CRLF).encode("ascii")

    headers_part = _header_section(original)
    headers_cte = "7bit" if headers_part.isascii() else "8bit"

    head = (
        CRLF.join(
            [
                f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
                f"To: <{to}>",
                f"Subject: {subject}",
                f"Date: {formatdate(now)}",
                f"Message-ID: {make_msgid('dsn', domain=mta)}",
                "Auto-Submitted: auto-replied",
                "MIME-Version: 1.0",
                f"Content-Type: multipart/report; report-type=delivery-status;{CRLF}"
                f' boundary="{boundary}"',
                "",
                "This is a MIME-encapsulated message.",
                "",
            ]
        )
        + CRLF
    )
    out = bytearray(head.encode("utf-8"))  # the To address may be SMTPUTF8

    def part(content_type: str, cte: str, body: bytes, extra: str = "") -> None:
        out.extend(f"--{boundary}{CRLF}Content-Type: {content_type}{CRLF}".encode())
        if extra:
            out.extend(f"{extra}{CRLF}".encode())
        out.extend(f"Content-Transfer-Encoding: {cte}{CRLF}{CRLF}".encode())
        out.extend(body)

    part('text/plain; charset="utf-8"', text_cte, text_body, "Content-Description: Notification")
    part("message/delivery-status", "7bit", status_body, "Content-Description: Delivery report")
    part(
        "text/rfc822-headers",
        headers_cte,
        headers_part,
        "Content-Description: Undelivered message headers"
        if kind == "failed"
        else "Content-Description: Delayed message headers",
    )
    out.extend(f"--{boundary}--{CRLF}".encode())
    return bytes(out)
