"""Bounces: an RFC 3464 report to the sender of a message that failed for good.

The report is queued as a new outbound message with the null sender, so it goes through
the same routing, retries and timeline as any other mail, and it can never bounce itself
(`should_bounce` refuses null senders and reports). The original's timeline records it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from relay.dsn import build_dsn, dsn_envelope, should_bounce
from relay.message import Claimed, Envelope, EventType, Kind, NewMessage, new_message_id
from relay.queue.base import Queue, StoreError

log = logging.getLogger("relay.dispatch")


class BounceSender:
    def __init__(
        self,
        *,
        queue: Queue,
        hostname: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.hostname = hostname
        self.clock = clock

    async def __call__(self, item: Claimed, failed: dict[str, str]) -> bool:
        """A report of the recipients that failed in a delivery round. True when queued."""
        return await self.send(
            msg_id=item.id,
            envelope=item.envelope,
            original=item.data,
            arrival=item.created,
            failed=failed,
        )

    async def send(
        self,
        *,
        msg_id: str,
        envelope: Envelope,
        original: bytes,
        arrival: float,
        failed: dict[str, str],
        dedupe: str | None = None,
    ) -> bool:
        """Queue a report to `envelope.mail_from` about `failed` (recipient → reason).

        `original` is the message, or only its header section once the body is gone (a
        provider's bounce may come after the relay dropped it). `dedupe` makes the report
        once-only (a provider's retried event). True when a report was queued now."""
        if not should_bounce(envelope, original):
            return False
        now = self.clock()
        report = build_dsn(
            original=original,
            envelope=envelope,
            failed=failed,
            reporting_mta=self.hostname,
            queue_id=msg_id,
            arrival=arrival,
            now=now,
        )
        dsn_id = new_message_id(now)
        message = NewMessage(
            id=dsn_id,
            kind=Kind.OUTBOUND,
            envelope=dsn_envelope(envelope),
            data=report,
            received_at=now,
            received={"dsn_for": msg_id, "from": "", "to": [envelope.mail_from]},
            dedupe=dedupe,
        )
        try:
            self.queue.check_accepting()
            if not await self.queue.insert(message):
                return False  # this report was queued before
        except StoreError as exc:
            # The failure itself is recorded; only the courtesy report is missing.
            log.error(
                "%s: could not queue the bounce to <%s>: %s",
                msg_id,
                envelope.mail_from,
                exc,
                extra={"event": "dsn_failed", "msg_id": msg_id, "reason": str(exc)},
            )
            return False
        try:
            await self.queue.add_event(
                msg_id,
                EventType.DSN,
                now,
                {"dsn_id": dsn_id, "to": envelope.mail_from, "recipients": sorted(failed)},
            )
        except StoreError as exc:
            log.error("%s: bounce %s queued but not noted on the timeline: %s", msg_id, dsn_id, exc)
        log.info(
            "%s: bounce %s queued to <%s>",
            msg_id,
            dsn_id,
            envelope.mail_from,
            extra={
                "event": "dsn",
                "msg_id": msg_id,
                "dsn_id": dsn_id,
                "sender": envelope.mail_from,
                "recipients": sorted(failed),
                "reason": "; ".join(f"{r}: {why}" for r, why in failed.items()),
            },
        )
        return True
