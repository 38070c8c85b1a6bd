"""The vocabulary every stage shares: message ids, the envelope, states and event types.

Kept free of I/O so that the SMTP layer, the spool, the dispatcher and the upstreams can
all import it without importing each other.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Ids need to be unique, not secret: a per-process PRNG seeded from the OS is enough and
# is much cheaper than a urandom call per message.
_random = random.Random(os.urandom(16))
# A forked worker must not repeat its parent's sequence.
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(16)))
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U


def new_message_id(now: float | None = None) -> str:
    """A 20-character id that sorts by arrival time (48-bit ms clock + 52 random bits).

    Sortable ids make `queue list` chronological for free and keep index inserts at the
    right-hand edge of the B-tree.
    """
    return _encode_id(now, _random.getrandbits(52))


def random_token() -> str:
    """32 hex digits from this process's PRNG: unique enough for a MIME boundary, and no
    system call (uuid4 reads os.urandom each time)."""
    return f"{_random.getrandbits(128):032x}"


def first_id_at(when: float) -> str:
    """The lowest id a message arriving at `when` can have: every message that arrived
    earlier has a lower id, so "arrived before T" is an id range an index can walk."""
    return _encode_id(when, 0)


def _encode_id(now: float | None, random_bits: int) -> str:
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 52) | random_bits
    chars = []
    for _ in range(20):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class Status(StrEnum):
    """Where a unit of work is in its life. `sending` means leased by a dispatcher."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    FAILED = "failed"
    HELD = "held"

    @property
    def final(self) -> bool:
        return self in (Status.SENT, Status.FAILED)


#: The states of work still waiting to be delivered (what "the oldest waiting" means).
WAITING = tuple(s.value for s in Status if not s.final)


class Kind(StrEnum):
    """The queue carries both directions; each kind has its own worker."""

    OUTBOUND = "outbound"
    INBOUND = "inbound"


class EventType(StrEnum):
    """Timeline vocabulary (DESIGN.md invariant 5)."""

    RECEIVED = "received"
    ATTEMPT = "attempt"
    DEFERRED = "deferred"
    SENT = "sent"
    FAILED = "failed"
    RECOVERED = "recovered"
    HELD = "held"
    RELEASED = "released"
    RETRY = "retry"
    FLUSHED = "flushed"
    DELETED = "deleted"
    DSN = "dsn"
    NOTE = "note"
    # From the providers' event webhooks (relay.events), after hand-over: one per
    # normalised event. A provider's own deferral is `delayed` here (the relay's own
    # retry is `deferred`); the webhook payloads out name it `deferred`.
    PROCESSED = "processed"
    DELIVERED = "delivered"
    DELAYED = "delayed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    DROPPED = "dropped"
    REJECTED = "rejected"
    UNSUBSCRIBED = "unsubscribed"
    # A recipient put back in the queue for another upstream after a provider-side drop.
    REQUEUED = "requeued"


@dataclass(frozen=True, slots=True)
class Envelope:
    """SMTP envelope: the only truth about who gets a message (headers may lie or omit Bcc).

    `mail_from` is "" for the null reverse-path (bounces). `queue_id` is the relay's id for
    the message, travelling with the envelope as Postfix's queue id does, so an upstream
    can tag the provider's copy with it (SendGrid custom_args, Postmark metadata) and the
    provider's event webhooks find their way back to the timeline.

    `crlf_only` says the SMTP listener checked that every line of the body ends in CRLF
    (it refuses bare CR and LF), so the smtp upstream can send it as it is instead of
    scanning 100 KB three more times to find out again.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    smtputf8: bool = False
    body_8bit: bool = False
    queue_id: str = ""
    crlf_only: bool = False

    def with_recipients(self, rcpts: tuple[str, ...]) -> Envelope:
        return dataclasses.replace(self, rcpt_tos=rcpts)


@dataclass(slots=True)
class Event:
    """One entry of a message's timeline."""

    type: EventType
    at: float
    detail: dict[str, object] = field(default_factory=dict)


#: The blank line that ends the header section.
HEADER_END = re.compile(rb"\r?\n\r?\n")


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(the header section without the blank line that ends it, the body). A message with
    no blank line is all header."""
    end = HEADER_END.search(data)
    return (data, b"") if end is None else (data[: end.start()], data[end.end() :])


@dataclass(slots=True)
class NewMessage:
    """A unit of work on its way into the queue: what a listener, the HTTP API, a bounce
    or an inbound notification hands to `Queue.insert`."""

    id: str
    kind: Kind
    envelope: Envelope
    data: bytes
    received_at: float
    received: dict[str, Any]  # the detail of the `received` event
    dedupe: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


SUBJECT_LIMIT = 200
# A field's value with its folded continuation lines.
_FIELD_VALUE = re.compile(rb"[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


# What the operator sees of a message's header after its body is gone (a sent message's
# body is dropped at once): kept in meta at arrival, read from the header section only.
SUMMARY_HEADERS = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID")
_SUMMARY_NAMES = {name.lower().encode(): name for name in SUMMARY_HEADERS}
# A header field at the start of a line: its name, then (obsolete syntax) blanks, a colon.
_FIELD_START = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


def header_summary(data: bytes, *, limit: int = SUBJECT_LIMIT) -> dict[str, str]:
    """The first occurrence of each of SUMMARY_HEADERS in the header section, as a reader
    sees it (RFC 2047 encoded-words decoded, folding undone, bytes that are not UTF-8 as
    U+FFFD, at most `limit` characters each). Never raises on malformed values: mail from
    anyone is shown as it came.

    On the listener's hot path: one regex pass over the header section only (found with
    bytes.find, no copy of the body), so a 100 KB message costs what its header does."""
    end = data.find(b"\n\r\n")
    end = len(data) if end < 0 else end
    bare = data.find(b"\n\n", 0, end)
    end = end if bare < 0 else bare
    found: dict[str, str] = {}
    for start in _FIELD_START.finditer(data, 0, end):
        name = _SUMMARY_NAMES.get(start.group(1).lower())
        if name is None or name in found:
            continue
        value = _FIELD_VALUE.match(data, start.end())
        assert value is not None  # the pattern matches the empty string too
        text = _FOLD.sub("", value.group().decode("utf-8", "replace")).strip()
        found[name] = (_decode_words(text) if "=?" in text else text)[:limit]
        if len(found) == len(SUMMARY_HEADERS):
            break
    return found


def subject_of(data: bytes) -> str | None:
    """The Subject header as a reader sees it (see header_summary)."""
    return header_summary(data).get("Subject")


def _decode_words(text: str) -> str:
    """RFC 2047 encoded-words, decoded; text that only looks encoded is kept as it is."""
    from email.header import decode_header, make_header  # only for encoded subjects

    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def stored_meta(msg: NewMessage) -> dict[str, Any]:
    """What the queue keeps beside the envelope: the original recipients (the pending list
    shrinks as rounds deliver), the envelope's flags, which `Claimed` restores, and an
    outbound message's subject (the operator's search) and header summary (what the
    operator sees of it once its body is gone)."""
    env = msg.envelope
    meta = dict(msg.meta)
    meta["rcpts_original"] = list(env.rcpt_tos)
    if msg.kind is Kind.OUTBOUND and "headers" not in meta:
        headers = header_summary(msg.data)
        subject = headers.pop("Subject", None)
        if subject and "subject" not in meta:
            meta["subject"] = subject
        if headers:
            meta["headers"] = headers
    if env.smtputf8:
        meta["smtputf8"] = True
    if env.body_8bit:
        meta["8bit"] = True
    if env.crlf_only:
        meta["crlf"] = True
    return meta


@dataclass(slots=True)
class Claimed:
    """A leased unit of work, with everything a worker needs to process it.

    `partition` is where the engine found it (a SQLite shard); callers hand it back
    unchanged with the item and never interpret it.
    """

    id: str
    kind: Kind
    envelope: Envelope
    data: bytes
    created: float
    attempts: int
    meta: dict[str, Any]
    partition: int = 0

    @property
    def window_start(self) -> float:
        """Where `retry.max_age` counts from: arrival, or an operator's retry of a message
        that had failed for good (its arrival time stays what it was)."""
        return float(self.meta.get("retried_at", self.created))
