"""Bounces: an RFC 3464 report to the sender of a message that failed for good.

The report is queued as a new outbound message with the null sender, so it goes through
the same routing, retries and timeline as any other mail, and it can never bounce itself
(`should_bounce` refuses null senders and reports). The original's timeline records it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from relay.dsn import build_dsn, dsn_envelope, should_bounce
from relay.message import Claimed, EventType, Kind, NewMessage, new_message_id
from relay.queue.base import Queue, StoreError

log = logging.getLogger("relay.dispatch")


class BounceSender:
    def __init__(
        self,
        *,
        queue: Queue,
        submit: Callable[[NewMessage], Awaitable[None]],
        hostname: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.submit = submit
        self.hostname = hostname
        self.clock = clock

    async def __call__(self, item: Claimed, failed: dict[str, str]) -> bool:
        """True when the bounce was queued."""
        if not should_bounce(item.envelope, item.data):
            return False
        now = self.clock()
        report = build_dsn(
            original=item.data,
            envelope=item.envelope,
            failed=failed,
            reporting_mta=self.hostname,
            queue_id=item.id,
            arrival=item.created,
            now=now,
        )
        dsn_id = new_message_id(now)
        message = NewMessage(
            id=dsn_id,
            kind=Kind.OUTBOUND,
            envelope=dsn_envelope(item.envelope),
            data=report,
            received_at=now,
            received={"dsn_for": item.id, "from": "", "to": [item.envelope.mail_from]},
        )
        try:
            await self.submit(message)
        except StoreError as exc:
            # The failure itself is recorded; only the courtesy report is missing.
            log.error(
                "%s: could not queue the bounce to <%s>: %s", item.id, item.envelope.mail_from, exc
            )
            return False
        try:
            await self.queue.add_event(
                item.id,
                EventType.DSN,
                now,
                {"dsn_id": dsn_id, "to": item.envelope.mail_from, "recipients": sorted(failed)},
            )
        except StoreError as exc:
            log.error(
                "%s: bounce %s queued but not noted on the timeline: %s", item.id, dsn_id, exc
            )
        log.info("%s: bounce %s queued to <%s>", item.id, dsn_id, item.envelope.mail_from)
        return True
