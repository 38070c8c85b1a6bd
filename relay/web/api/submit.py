"""Submitting mail over HTTP under SMTP's rules, and making it durable before answering.

A JSON submission (built into MIME by `compose`) or a raw message/rfc822 body goes
through the same checks as an SMTP session: the token's allowed senders (the null sender
only when "<>" is listed), envelope address syntax, `smtp.max_recipients` and
`smtp.max_message_size`. It then becomes a `NewMessage` like the listener's (a Received
trace header, the `received` event, the envelope's flags) and `ctx.submit` makes it
durable: the id is returned only after that, as SMTP answers 250 only then.

An `Idempotency-Key` makes a retried request safe: the key is stored with the message
(`dedupe` = "api:<token>:<key>"), and the same key from the same token within 24 hours
returns the first message's id and queues nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from relay.address import Problem, mailbox_problem
from relay.message import Envelope, Kind, NewMessage, new_message_id
from relay.queue.base import StoreError, StoreFull
from relay.smtp.auth import sender_allowed
from relay.suppression import describe, removal_hint
from relay.telemetry.classify import (
    ACCEPTED,
    DEFERRED,
    REFUSED_ADDRESS,
    REFUSED_OTHER,
    REFUSED_POLICY,
    REFUSED_SIZE,
)
from relay.web.api.compose import Composed, SubmitError, compose, invalid
from relay.web.auth import Principal
from relay.web.context import WebContext
from relay.wire import crlf_only

__all__ = ["Origin", "SubmitError", "submit_json", "submit_raw"]

log = logging.getLogger("relay.web.api")

IDEMPOTENCY_WINDOW = 24 * 3600.0
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
NULL_SENDER = "<>"
MAX_SUBJECT_META = 200
# A second after a full queue: the client's retry lands when space may be back.
RETRY_AFTER_FULL, RETRY_AFTER_ERROR = 60, 10
HEADER_LINE = re.compile(rb"[!-9;-~]+:")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a submission came from: the trace header and the `received` event say it."""

    client: str = "unknown"
    tls: bool = False
    via: str = "api"  # "api" or "page"


# The request fields that hold addresses: a refusal naming one is an address refusal.
ADDRESS_FIELDS = frozenset({"from", "to", "cc", "bcc", "reply_to"})


def count_submission(ctx: WebContext, via: str, error: SubmitError | None) -> None:
    """Count a message offered over HTTP (`via` "api" or "page") as the SMTP listener
    counts its transactions: accepted, deferred (the queue could not take it: try again)
    or refused, by class. A repeated idempotent request is not a new message: not counted."""
    if ctx.telemetry is None:
        return
    if error is None:
        result = ACCEPTED
    elif error.status == 503:
        result = DEFERRED
    elif error.status == 413:
        result = REFUSED_SIZE
    elif error.status == 403:
        result = REFUSED_POLICY
    elif (error.field or "").partition("[")[0] in ADDRESS_FIELDS:
        result = REFUSED_ADDRESS
    else:
        result = REFUSED_OTHER
    ctx.telemetry.message_received(via, result)


async def submit_json(
    ctx: WebContext,
    principal: Principal,
    payload: Any,
    *,
    idempotency_key: str | None = None,
    origin: Origin = Origin(),
) -> tuple[str, bool]:
    """Queue a JSON submission: (message id, True when queued now; False when an earlier
    request with the same idempotency key queued it). Raises SubmitError."""
    now = ctx.clock()
    msg_id = new_message_id(now)
    try:
        key = _check_key(idempotency_key)
        built = compose(payload, msg_id=msg_id, hostname=ctx.config.server.hostname, now=now)
        _check_sender(principal, built.mail_from, "from")
        _check_recipient_count(ctx, built.rcpt_fields)
        _check_suppressed(ctx, built.mail_from, built.rcpts, built.rcpt_fields)
        return await _queue(
            ctx, principal, built, msg_id=msg_id, now=now, key=key, origin=origin, form="json"
        )
    except SubmitError as exc:
        _log_refusal(principal, origin, exc)
        raise


async def submit_raw(
    ctx: WebContext,
    principal: Principal,
    data: bytes,
    *,
    mail_from: str,
    rcpts: Sequence[str],
    idempotency_key: str | None = None,
    origin: Origin = Origin(),
) -> tuple[str, bool]:
    """Queue a message given as bytes with its envelope (the `from` and `to` query
    parameters). Bare LF line ends become CRLF; a bare CR is refused, as over SMTP."""
    now = ctx.clock()
    msg_id = new_message_id(now)
    try:
        key = _check_key(idempotency_key)
        sender = "" if mail_from in ("", NULL_SENDER) else mail_from
        smtputf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
        if sender:
            _check_address(sender, "from")
        if not rcpts:
            raise invalid("to", "give at least one recipient as a 'to' query parameter")
        for i, rcpt in enumerate(rcpts):
            _check_address(rcpt, f"to[{i}]")
        _check_sender(principal, sender, "from")
        fields = tuple(f"to[{i}]" for i in range(len(rcpts)))
        _check_recipient_count(ctx, fields)
        _check_suppressed(ctx, sender, rcpts, fields)
        body = _normalized(data)
        built = Composed(
            mail_from=sender,
            rcpts=tuple(rcpts),
            rcpt_fields=fields,
            data=body,
            smtputf8=smtputf8,
            subject="",  # the queue reads it from the header (relay.message.subject_of)
        )
        return await _queue(
            ctx, principal, built, msg_id=msg_id, now=now, key=key, origin=origin, form="raw"
        )
    except SubmitError as exc:
        _log_refusal(principal, origin, exc)
        raise


# -- the rules SMTP applies too --------------------------------------------------------


def _check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise invalid("Idempotency-Key", "use 1 to 255 printable ASCII characters, no spaces")
    return key


def _check_address(address: str, field_name: str) -> None:
    problem = mailbox_problem(address, smtputf8=True)
    if problem is Problem.NO_DOMAIN:
        raise invalid(field_name, f"{address!r} has no domain; use a full address such as a@b")
    if problem is not None:
        raise invalid(field_name, f"{address!r} is not a valid email address")


def _check_sender(principal: Principal, sender: str, field_name: str) -> None:
    """The token may send as its allowed_senders only; the null sender (bounces) only
    when "<>" is listed, as for SMTP users."""
    allowed = principal.allowed_senders
    if sender and sender_allowed(principal, sender):
        return
    if not sender and NULL_SENDER in allowed:
        return
    shown = sender or NULL_SENDER
    raise SubmitError(
        403,
        "sender_not_allowed",
        f"the token {principal.name!r} may not send as {shown}; its allowed_senders are"
        f" {', '.join(allowed) or '(none)'} (see [[web.tokens]])",
        field_name,
    )


def _check_recipient_count(ctx: WebContext, fields: tuple[str, ...]) -> None:
    limit = ctx.config.smtp.max_recipients
    if len(fields) > limit:
        raise SubmitError(
            400,
            "too_many_recipients",
            f"{len(fields)} recipients; at most {limit} per message (smtp.max_recipients):"
            " split the message",
            fields[limit],
        )


def _check_suppressed(
    ctx: WebContext, sender: str, rcpts: Sequence[str], fields: Sequence[str]
) -> None:
    """A recipient on the suppression list refuses the whole submission (422), as RCPT TO
    refuses it over SMTP; nothing is queued. Under `action = "bounce"` it is let in."""
    suppressions = ctx.suppressions
    if suppressions is None or not suppressions.refuses:
        return
    for rcpt, field_name in zip(rcpts, fields, strict=True):
        entry = suppressions.check(rcpt, sender)
        if entry is not None:
            raise SubmitError(
                422,
                "suppressed_recipient",
                f"{field_name}: {rcpt} is on the suppression list ({describe(entry)});"
                " leave it out, or ask the relay's operator to lift it"
                f" (`{removal_hint(entry)}`)",
                field_name,
            )


def _check_size(ctx: WebContext, size: int) -> None:
    limit = int(ctx.config.smtp.max_message_size)
    if size > limit:
        raise SubmitError(
            413,
            "too_large",
            f"the message is {size} bytes; the relay takes at most {limit} (smtp.max_message_size)",
            None,
        )


def _normalized(data: bytes) -> bytes:
    """CRLF line ends, ending in one; a header section first."""
    if not data.strip():
        raise invalid("body", "the message is empty")
    if not HEADER_LINE.match(data):
        raise invalid("body", "the message must start with a header line such as 'From: ...'")
    if not crlf_only(data):
        if b"\r" in data.replace(b"\r\n", b""):
            raise invalid("body", "a bare CR (not followed by LF) is not allowed in a message")
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


# -- into the queue ------------------------------------------------------------------


async def _queue(
    ctx: WebContext,
    principal: Principal,
    built: Composed,
    *,
    msg_id: str,
    now: float,
    key: str | None,
    origin: Origin,
    form: str,
) -> tuple[str, bool]:
    dedupe = None if key is None else f"api:{principal.name}:{key}"
    since = now - IDEMPOTENCY_WINDOW
    if dedupe is not None:
        first = await _dedupe_owner(ctx, dedupe, since)
        if first is not None:
            log.info("API: idempotency key of %s seen before: %s", principal.name, first)
            return first, False
    protocol = "HTTPS" if origin.tls else "HTTP"
    received = _trace_header(ctx, msg_id, built.rcpts, origin, protocol, now)
    data = received + built.data
    _check_size(ctx, len(data))
    envelope = Envelope(
        mail_from=built.mail_from,
        rcpt_tos=built.rcpts,
        smtputf8=built.smtputf8,
        body_8bit=not data.isascii(),
        crlf_only=crlf_only(data),
    )
    detail: dict[str, Any] = {
        "client": origin.client,
        "protocol": protocol,
        "tls": origin.tls,
        "listener": str(ctx.config.web.listen),
        "via": origin.via,
        "form": form,
        "token": principal.name,
        "size": len(built.data),
        "from": built.mail_from,
        "to": list(built.rcpts),
    }
    if key is not None:
        detail["idempotency_key"] = key
    meta: dict[str, Any] = {}
    if built.subject:
        meta["subject"] = built.subject[:MAX_SUBJECT_META]
    if built.tags:
        meta["tags"] = built.tags
    message = NewMessage(
        id=msg_id,
        kind=Kind.OUTBOUND,
        envelope=envelope,
        data=data,
        received_at=now,
        received=detail,
        dedupe=dedupe,
        meta=meta,
    )
    try:
        await ctx.submit(message)
    except StoreFull as exc:
        log.error("API: refusing a message from %s: %s", origin.client, exc)
        raise _unavailable(f"the queue is full: {exc}", RETRY_AFTER_FULL) from None
    except StoreError as exc:
        log.error("API: refusing a message from %s: %s", origin.client, exc)
        raise _unavailable(
            f"the queue cannot store messages now: {exc}", RETRY_AFTER_ERROR
        ) from None
    if dedupe is not None:
        # Two requests with one key at once: the queue kept one; both answer its id.
        first = await _dedupe_owner(ctx, dedupe, since)
        if first is not None and first != msg_id:
            log.info("API: idempotency key of %s taken meanwhile by %s", principal.name, first)
            return first, False
    log.info(
        "%s queued via %s from %s as token %s: <%s> -> %d recipient(s), %d bytes",
        msg_id,
        origin.via,
        origin.client,
        principal.name,
        envelope.mail_from,
        len(envelope.rcpt_tos),
        len(data),
    )
    return msg_id, True


async def _dedupe_owner(ctx: WebContext, dedupe: str, since: float) -> str | None:
    try:
        return await ctx.queue.dedupe_owner(dedupe, since=since)
    except StoreError as exc:
        raise _unavailable(f"the queue cannot be read now: {exc}", RETRY_AFTER_ERROR) from None


def _unavailable(message: str, retry_after: int) -> SubmitError:
    error = SubmitError(503, "queue_unavailable", f"{message}; nothing was queued, try again later")
    error.retry_after = retry_after
    return error


def _trace_header(
    ctx: WebContext,
    msg_id: str,
    rcpts: tuple[str, ...],
    origin: Origin,
    protocol: str,
    now: float,
) -> bytes:
    """A Received header like the SMTP listener's. "for" names the recipient only when
    there is one: several would show Bcc recipients to everyone."""
    client = re.sub(r"[^0-9A-Fa-f.:]", "?", origin.client)
    for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
    return (
        f"Received: from [{client}]\r\n"
        f"\tby {ctx.config.server.hostname} (relay) with {protocol} id {msg_id}{for_clause};"
        f"\r\n\t{formatdate(now)}\r\n"
    ).encode("utf-8", "replace")


def _log_refusal(principal: Principal, origin: Origin, exc: SubmitError) -> None:
    log.warning(
        "API: refused a message from %s (token %s): %s %s%s",
        origin.client,
        principal.name,
        exc.status,
        exc.message,
        f" [field {exc.field}]" if exc.field else "",
    )
