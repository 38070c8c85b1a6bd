"""Provider events → the relay's record of them, and what they set in motion.

A provider's webhook says what happened after it took a message: delivered, bounced,
complained, dropped. Each event is matched to our message (the relay id the upstream sent
along, else the provider's message id indexed at hand-over) and recipient, recorded on the
timeline once (providers retry: the event's key makes a repeat a no-op), and then:

- a hard bounce or complaint puts the address on the suppression list (`[suppression] on`);
- a hard bounce sends the sender an RFC 3464 report (`[events] bounce_reports`);
- a drop for the provider's own reasons puts the recipient back in the queue for another
  upstream, never the same one twice for a message (`[events] requeue`);
- the applications' webhooks (`[[webhook]]`) get the event, signed, through the outbox.

Every effect is idempotent on its own (suppression upserts, the report's dedupe key, the
requeue's key, the outbox's (hook, key)), and all of them run even for a repeated event:
a crash after the record and before an effect is mended by the provider's retry, which
only comes because the relay had not answered 200 yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.config import Config
from relay.events.model import STATUS_OF, TIMELINE_TYPE, MessageEvent, ProviderEvent
from relay.message import Claimed, Envelope, Kind
from relay.queue.base import DeliveryRecord, MessageRow, Queue, QueueActionError, Round

if TYPE_CHECKING:
    from relay.dispatch.bounces import BounceSender
    from relay.suppression import SuppressionList
    from relay.telemetry.core import Telemetry

log = logging.getLogger("relay.events")

#: Messages of one request worked on at once: enough to fill a group commit, few enough
#: that a batch of a thousand events does not crowd out the process's mail intake.
STREAMS_AT_ONCE = 8

#: The suppression reason each event stands for (a soft bounce stands for none).
_SUPPRESS = {"complained": "complaint", "unsubscribed": "unsubscribe"}


@dataclass(slots=True)
class Applied:
    """What a webhook request's events did, for its answer and the logs."""

    recorded: int = 0
    duplicates: int = 0
    unmatched: int = 0
    requeued: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class EventService:
    def __init__(
        self,
        *,
        config: Config,
        queue: Queue,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
        bouncer: BounceSender | None = None,
        suppression: SuppressionList | None = None,
        outbox_wake: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.clock = clock
        self.telemetry = telemetry
        self._bouncer = bouncer
        self.suppression = suppression
        self.outbox_wake = outbox_wake
        # Fetches SNS signing certificates for SES events (looked up per call, so tests
        # can swap it after start); made on first use, closed in `close`.
        self.cert_fetcher: Callable[[str], Awaitable[bytes]] | None = None

    @property
    def upstreams(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.config.upstream)

    @property
    def bouncer(self) -> BounceSender | None:
        return self._bouncer if self.config.events.bounce_reports else None

    def reconfigure(self, config: Config) -> None:
        """A reload's config: read per event, so the next event follows it."""
        self.config = config

    async def fetch(self, url: str) -> bytes:
        if self.cert_fetcher is None:
            from relay.inbound.sns import HTTPSFetcher

            self.cert_fetcher = HTTPSFetcher()
        return await self.cert_fetcher(url)

    async def close(self) -> None:
        from relay.inbound.sns import HTTPSFetcher

        if isinstance(self.cert_fetcher, HTTPSFetcher):
            await self.cert_fetcher.close()

    # -- the providers' events ---------------------------------------------------------------

    async def apply(self, upstream: str, events: Sequence[ProviderEvent]) -> Applied:
        """Record and act on a verified request's events, in order. Raises StoreError
        (QueueBusy included) when the queue can't take them now: the caller answers 503
        and the provider sends them again."""
        applied = Applied()
        # A provider batches events of many messages into one request (SendGrid: up to
        # 768 KB): the messages are worked on at once, so their reads overlap and their
        # writes share the queue's group commits; one message's events stay in order.
        streams: dict[str, list[ProviderEvent]] = {}
        for event in events:
            streams.setdefault(event.relay_id or event.provider_id or "", []).append(event)
        if len(streams) == 1:
            out = await self._apply_stream(upstream, events, applied)
        else:
            turns = asyncio.Semaphore(STREAMS_AT_ONCE)

            async def stream(part: Sequence[ProviderEvent]) -> list[MessageEvent]:
                async with turns:
                    return await self._apply_stream(upstream, part, applied)

            parts = await asyncio.gather(
                *(stream(s) for s in streams.values()), return_exceptions=True
            )
            for part in parts:  # every stream ran its course: then the first failure
                if isinstance(part, BaseException):
                    raise part
            out = [e for part in parts if not isinstance(part, BaseException) for e in part]
        await self._publish(out)
        return applied

    async def _apply_stream(
        self, upstream: str, events: Sequence[ProviderEvent], applied: Applied
    ) -> list[MessageEvent]:
        out: list[MessageEvent] = []
        for event in events:
            out += await self._apply_one(upstream, event, applied)
        return out

    async def _apply_one(
        self, upstream: str, event: ProviderEvent, applied: Applied
    ) -> list[MessageEvent]:
        row = await self._message_of(event)
        if row is None:
            applied.unmatched += 1
            self._count(upstream, "unmatched")
            log.info(
                "%s %s for <%s> matches no message here (relay id %s, provider id %s)",
                upstream,
                event.event,
                event.recipient,
                event.relay_id,
                event.provider_id,
                extra={
                    "event": "unmatched",
                    "upstream": upstream,
                    "provider_event": event.provider_event,
                    "recipient": event.recipient,
                    "relay_id": event.relay_id,
                    "provider_id": event.provider_id,
                },
            )
            await self._suppress(event, upstream, sender=event.sender or "")
            return []
        rcpt = _recipient_of(row, event.recipient)
        detail: dict[str, Any] = {"recipient": rcpt, "upstream": upstream, "event": event.event}
        for name, value in (
            ("provider_event", event.provider_event),
            ("provider_id", event.provider_id),
            ("bounce", event.bounce),
            ("reason", event.reason),
        ):
            if value:
                detail[name] = value
        record = DeliveryRecord(
            key=event.key,
            msg_id=row.id,
            rcpt=rcpt,
            type=TIMELINE_TYPE[event.event],
            at=event.at,
            detail=detail,
            status=STATUS_OF[event.event],
        )
        if await self.queue.record_delivery(record):
            applied.recorded += 1
            self._count(upstream, f"{event.bounce}_bounce" if event.bounce else event.event)
            log.info(
                "%s %s <%s> via %s%s",
                row.id,
                event.event,
                rcpt,
                upstream,
                _why(event),
                extra={
                    # The timeline's name: a provider's deferral is `delayed` (the
                    # relay's own retry is `deferred`).
                    "event": record.type.value,
                    "msg_id": row.id,
                    "recipient": rcpt,
                    "upstream": upstream,
                    "provider_event": event.provider_event,
                    "provider_id": event.provider_id,
                    "bounce": event.bounce,
                    "reason": event.reason,
                },
            )
        else:
            applied.duplicates += 1
        await self._suppress(event, upstream, sender=row.mail_from)
        out: list[MessageEvent] = []
        if event.event != "processed":
            out.append(_message_event(row.id, upstream, rcpt, event))
        if event.event == "bounced" and event.bounce == "hard":
            reason = f"{upstream} reported a hard bounce: {event.reason or event.provider_event}"
            await self._report(row, {rcpt: reason}, key=event.key)
        if event.provider_fault and self.config.events.requeue:
            done, resent = await self._resend(row, rcpt, upstream, event)
            applied.requeued += done
            if resent is not None:
                out.append(resent)
        return out

    async def _message_of(self, event: ProviderEvent) -> MessageRow | None:
        """Our outbound message the event is about: by the relay id the provider echoed,
        else by the provider's message id."""
        row = None
        if event.relay_id:
            row = await self.queue.get(event.relay_id)
        if row is None and event.provider_id:
            msg_id = await self.queue.find_by_provider_id(event.provider_id)
            row = await self.queue.get(msg_id) if msg_id else None
        return row if row is not None and row.kind == Kind.OUTBOUND else None

    async def _suppress(self, event: ProviderEvent, upstream: str, *, sender: str) -> None:
        reason = "hard_bounce" if event.bounce == "hard" else _SUPPRESS.get(event.event)
        if event.event == "bounced" and event.bounce != "hard":
            reason = None
        sup = self.suppression
        if sup is None or reason is None or not sup.reason_applies(reason):
            return
        entry = sup.entry(
            reason,
            event.recipient,
            sender=sender,
            source=f"{upstream} {event.key}",
            now=self.clock(),
            detail=event.reason or event.provider_event,
        )
        await sup.add([entry])

    async def _resend(
        self, row: MessageRow, rcpt: str, upstream: str, event: ProviderEvent
    ) -> tuple[bool, MessageEvent | None]:
        """Send the recipient through an upstream that has not dropped it yet; when none is
        left (or the body is gone), it failed for good and the sender hears of it. (Whether
        it was requeued now, the `requeued` event for the apps: also for a repeat, which
        the outbox ignores, so a crash between the two is mended by the repeat.)"""
        excluded = {*(row.meta.get("excluded_upstreams") or ()), upstream}
        reason = f"{upstream} {event.event} it: {event.reason or event.provider_event}"
        if all(name in excluded for name in self.upstreams):
            why = f"dropped by every upstream ({', '.join(sorted(excluded))}); last: {reason}"
            await self._report(row, {rcpt: why}, key=event.key)
            return False, None
        try:
            done = await self.queue.requeue(
                row.id,
                [rcpt],
                exclude=upstream,
                now=self.clock(),
                reason=reason,
                key=f"requeue:{event.key}",
            )
        except QueueActionError as exc:
            log.warning(
                "%s: <%s> not re-sent after %s: %s",
                row.id,
                rcpt,
                reason,
                exc,
                extra={
                    "event": "requeue_failed",
                    "msg_id": row.id,
                    "recipient": rcpt,
                    "upstream": upstream,
                    "reason": f"{reason} (not re-sent: {exc})",
                },
            )
            await self._report(row, {rcpt: f"{reason} (not re-sent: {exc})"}, key=event.key)
            return False, None
        if done:
            log.info(
                "%s: <%s> back in the queue: %s",
                row.id,
                rcpt,
                reason,
                extra={
                    "event": "requeued",
                    "msg_id": row.id,
                    "recipient": rcpt,
                    "upstream": upstream,
                    "reason": reason,
                },
            )
            if self.telemetry is not None:
                self.telemetry.requeued(upstream)
        return done, MessageEvent(
            id=f"{event.key}:requeued",
            event="requeued",
            message_id=row.id,
            at=event.at,
            recipient=rcpt,
            upstream=upstream,
            reason=reason,
        )

    async def _report(self, row: MessageRow, failed: dict[str, str], *, key: str) -> None:
        """An RFC 3464 report to the sender, once per event."""
        if self.bouncer is None:
            return
        original = await self.queue.body(row.id) or _header_block(row)
        rcpts = tuple(row.meta.get("rcpts_original") or row.rcpts)
        await self.bouncer.send(
            msg_id=row.id,
            envelope=Envelope(row.mail_from, rcpts),
            original=original,
            arrival=row.created,
            failed=failed,
            dedupe=f"dsn:{key}",
        )

    # -- the relay's own events, for the applications' webhooks --------------------------------

    async def after_round(self, item: Claimed, rnd: Round) -> None:
        """`sent` for each recipient a round handed over, `failed` for each that failed for
        good in it."""
        if not self.config.webhook:
            return
        now = self.clock()
        round_no = item.attempts + 1
        out = [
            MessageEvent(
                id=f"{item.id}:sent:{round_no}:{rcpt}",
                event="sent",
                message_id=item.id,
                at=now,
                recipient=rcpt,
                upstream=d["upstream"],
                detail={"provider_id": d.get("provider_id")},
            )
            for d in rnd.delivered
            for rcpt in d.get("recipients") or ()
        ]
        earlier = item.meta.get("rcpts_failed") or {}
        out += [
            MessageEvent(
                id=f"{item.id}:failed:{rcpt}",
                event="failed",
                message_id=item.id,
                at=now,
                recipient=rcpt,
                reason=why,
            )
            for rcpt, why in rnd.failed.items()
            if rcpt not in earlier
        ]
        await self._publish(out)

    async def _publish(self, events: list[MessageEvent]) -> None:
        if not events or not self.config.webhook:
            return
        from relay.events.outbox import publish

        added = await publish(self.queue.outbox, self.config.webhook, events, now=self.clock())
        if added and self.outbox_wake is not None:
            self.outbox_wake()

    def _count(self, upstream: str, event: str) -> None:
        if self.telemetry is not None:
            self.telemetry.provider_event(upstream, event)


def _recipient_of(row: MessageRow, address: str) -> str:
    """The recipient as the message has it (providers may change the case)."""
    wanted = address.strip().lower()
    for rcpt in row.meta.get("rcpts_original") or row.rcpts:
        if rcpt.lower() == wanted:
            return str(rcpt)
    return address


def _message_event(msg_id: str, upstream: str, rcpt: str, event: ProviderEvent) -> MessageEvent:
    detail: dict[str, object] = {"provider_event": event.provider_event}
    if event.provider_id:
        detail["provider_id"] = event.provider_id
    if event.bounce:
        detail["bounce"] = event.bounce
    return MessageEvent(
        id=event.key,
        event=event.event,
        message_id=msg_id,
        at=event.at,
        recipient=rcpt,
        upstream=upstream,
        reason=event.reason,
        detail=detail,
    )


def _why(event: ProviderEvent) -> str:
    parts = [p for p in (event.bounce, event.reason) if p]
    return f": {' '.join(parts)}" if parts else ""


def _header_block(row: MessageRow) -> bytes:
    """The original's header summary (kept in meta at arrival) as a header section, for a
    report about a message whose body the relay no longer has."""
    headers = dict(row.meta.get("headers") or {})
    if row.meta.get("subject"):
        headers["Subject"] = row.meta["subject"]
    lines = [f"{name}: {' '.join(str(value).split())}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")
