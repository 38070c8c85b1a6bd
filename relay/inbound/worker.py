"""One attempt at a unit of inbound work: fetch → decrypt → parse → route → deliver.

The scheduler leases `Kind.INBOUND` rows from the queue and hands each to `process()`.
Every step's failure is classified like an upstream's (DESIGN.md invariant 3):

- transient (S3 throttled or unreachable, KMS unreachable, a destination down or answering
  5xx): the work is deferred by `[retry]`'s schedule, for the recipients still pending;
- permanent (the object is gone, KMS refuses the key or its encryption context, the
  ciphertext fails its authentication tag, a destination answers 4xx/5xx for good): the
  work fails with the reason on its timeline and stays in the queue as a dead letter for
  `relay queue retry`. Nothing that failed to decrypt is ever handed on.

Recipients are routed to `[[inbound.route]]`s; each route's destination gets one delivery
for its recipients. When a destination serves some recipients and not others, only the
others are retried (the queue row's `rcpts` holds who is still pending, as for outbound).
Past `retry.max_age` pending recipients fail.

Like the outbound worker, an attempt writes all its timeline events and the new state in
ONE queue transaction, then calls `on_finish` (what `Relay.wait_for` awaits).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.dispatch.retry import RetryPolicy
from relay.dispatch.scheduler import record_outcome
from relay.inbound import jsonlimits
from relay.inbound.decrypt import DecryptError, Decryptor
from relay.inbound.destinations.base import Destination, PartialDelivery
from relay.inbound.fetch import FetchError, S3Fetcher
from relay.inbound.notify import InboundWork
from relay.inbound.parse import ParsedMessage, parse_message
from relay.inbound.settings import InboundSettings, RouteSettings
from relay.message import HEADER_END, Claimed, EventType
from relay.outcomes import PermanentError, TransientError, UpstreamError
from relay.queue.base import Queue, Round

if TYPE_CHECKING:
    from relay.telemetry.core import Telemetry

log = logging.getLogger("relay.inbound")

#: The key a stored notification that can't be acted on carries instead of the work.
UNUSABLE_KEY = "unusable"

_SUBJECT = re.compile(rb"(?im)^subject:[ \t]*")


def tag_message(raw: bytes, *, spam: bool, virus: bool, verdicts: str) -> bytes:
    """The message with verdict headers prepended and a `[SPAM]`/`[VIRUS]` Subject prefix.

    Headers are prepended (as trace headers are) and the Subject is edited in place as
    bytes, so the rest of the message, its body and attachments stay byte for byte as
    received. The prefix goes before any encoded-word, which stays valid.
    """
    eol = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    labels = [label for flag, label in ((virus, b"[VIRUS]"), (spam, b"[SPAM]")) if flag]
    prefix = b" ".join(labels) + b" "
    added = b"X-Relay-Verdicts: " + verdicts.encode("ascii", "replace") + eol
    if spam:
        added += b"X-Spam-Flag: YES" + eol
    if virus:
        added += b"X-Virus-Flag: YES" + eol
    end = HEADER_END.search(raw)
    header_len = end.start() if end else len(raw)
    match = _SUBJECT.search(raw, 0, header_len)
    if match:
        raw = raw[: match.end()] + prefix + raw[match.end() :]
    else:
        added += b"Subject: " + prefix.rstrip() + eol
    return added + raw


def quarantine_copy(raw: bytes, *, reason: str, route: str, recipients: Sequence[str]) -> bytes:
    """The message as filed in quarantine: headers say why, and for whom it was meant (a
    Maildir keeps no envelope), so an operator can release it by hand."""
    eol = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    note = f"X-Relay-Quarantined: {reason}; route={route}".encode("utf-8", "replace") + eol
    if recipients:
        note += f"X-Relay-Recipients: {', '.join(recipients)}".encode("utf-8", "replace") + eol
    return note + raw


@dataclass
class _Round:
    """What one attempt did, collected before it is written in one transaction."""

    pending: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    delivered: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[EventType, float, dict[str, Any]]] = field(default_factory=list)
    last_error: str | None = None
    retry_after: float | None = None
    # No recipient is known (an S3 event for mail without To/Cc, delivered to the catch-all
    # route, or a fetch that failed before the headers were read): these say what happens
    # to the message as a whole.
    retry_whole: bool = False
    whole_failure: str | None = None


class StepFailed(Exception):
    """A step before routing (fetch, decrypt) failed; `permanent` as the step said."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class InboundWorker:
    """Processes leased inbound work; see the module docstring."""

    def __init__(
        self,
        *,
        queue: Queue,
        settings: InboundSettings,
        fetcher: S3Fetcher,
        decryptor: Decryptor,
        destinations: Mapping[str, Destination],
        quarantines: Mapping[str, Destination],
        policy: RetryPolicy,
        clock: Callable[[], float] = time.time,
        on_finish: Callable[[], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.queue = queue
        self.telemetry = telemetry
        self.settings = settings
        self.fetcher = fetcher
        self.decryptor = decryptor
        # route name -> destination; quarantine Maildir path -> destination
        self.destinations = dict(destinations)
        self.quarantines = dict(quarantines)
        self.policy = policy
        self.clock = clock
        self.on_finish = on_finish

    # -- the attempt ---------------------------------------------------------------------

    async def process(self, item: Claimed) -> None:
        rnd = _Round(pending=list(item.envelope.rcpt_tos))
        try:
            payload = jsonlimits.loads(item.data)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
            if UNUSABLE_KEY in payload:
                await self._fail_whole(
                    item, rnd, f"notification cannot be acted on: {payload[UNUSABLE_KEY]}"
                )
                return
            work = InboundWork.from_dict(payload)
        except (ValueError, TypeError) as exc:
            await self._fail_whole(item, rnd, f"stored inbound work is unreadable: {exc}")
            return
        try:
            await self._attempt(item, work, rnd)
        except StepFailed as exc:
            if exc.permanent:
                await self._fail_whole(item, rnd, exc.reason)
                return
            rnd.last_error = exc.reason
            rnd.retry_whole = not rnd.pending
        except Exception as exc:  # a bug must not strand the work until its lease expires
            log.exception("inbound %s: unexpected error", item.id)
            rnd.last_error = f"internal error: {type(exc).__name__}: {exc}"
            rnd.retry_whole = not rnd.pending
        await self._finish(item, rnd)

    async def _attempt(self, item: Claimed, work: InboundWork, rnd: _Round) -> None:
        where = f"s3://{work.bucket}/{work.key}"
        started = time.monotonic()
        try:
            obj = await self.fetcher.get(work.bucket, work.key)
        except FetchError as exc:
            self._step_event(rnd, "fetch", where, started, exc.reason, exc.permanent)
            raise StepFailed(f"fetch {exc.reason}", permanent=exc.permanent) from exc

        started = time.monotonic()
        try:
            raw = await self.decryptor.decrypt_object(obj)
        except DecryptError as exc:
            self._step_event(rnd, "decrypt", where, started, exc.reason, exc.permanent)
            suffix = "; not delivered" if exc.permanent else ""
            raise StepFailed(
                f"decrypt {where}: {exc.reason}{suffix}", permanent=exc.permanent
            ) from exc

        parsed = await asyncio.to_thread(parse_message, raw)
        if not rnd.pending and not item.meta.get("rcpts_original"):
            # An S3 event carries no envelope: the headers are all there is to route by.
            rnd.pending = list(parsed.header_recipients())
            rnd.events.append(
                (
                    EventType.NOTE,
                    self.clock(),
                    {
                        "routing": "no envelope recipients in the notification: "
                        "routed by the To/Cc headers",
                        "recipients": list(rnd.pending),
                    },
                )
            )
        await self._route(work, raw, parsed, rnd)

    def _step_event(
        self,
        rnd: _Round,
        step: str,
        where: str,
        started: float,
        reason: str,
        permanent: bool,
    ) -> None:
        rnd.events.append(
            (
                EventType.ATTEMPT,
                self.clock(),
                {
                    "step": step,
                    "object": where,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    "outcome": "permanent" if permanent else "transient",
                    "reason": reason,
                },
            )
        )

    # -- routing and delivery ------------------------------------------------------------

    def _groups(self, rnd: _Round) -> list[tuple[RouteSettings, list[str]]]:
        """Recipients grouped by their route, in route order; unrouted ones fail."""
        if not rnd.pending:
            catch_all = self.settings.catch_all
            if catch_all is None:
                return []
            return [(catch_all, [])]
        groups: dict[str, tuple[RouteSettings, list[str]]] = {}
        for rcpt in rnd.pending:
            route = self.settings.route_for(rcpt)
            if route is None:
                rnd.failed[rcpt] = "no [[inbound.route]] matches this recipient"
                continue
            groups.setdefault(route.name, (route, []))[1].append(rcpt)
        return sorted(groups.values(), key=lambda g: self.settings.routes.index(g[0]))

    async def _route(
        self, work: InboundWork, raw: bytes, parsed: ParsedMessage, rnd: _Round
    ) -> None:
        if not rnd.pending and self.settings.catch_all is None:
            rnd.whole_failure = (
                "the message has no recipients (none in the notification, none in To/Cc) "
                'and no route takes every address ("*")'
            )
            return
        groups = self._groups(rnd)
        rnd.pending = []
        tagged: tuple[bytes, ParsedMessage] | None = None
        verdicts = (
            f"spam={work.spam_verdict or '-'}; virus={work.virus_verdict or '-'}; "
            f"spf={work.spf_verdict or '-'}; dkim={work.dkim_verdict or '-'}; "
            f"dmarc={work.dmarc_verdict or '-'}"
        )
        for route, recipients in groups:
            action = route.action(spam=work.is_spam, virus=work.has_virus)
            data, message = raw, parsed
            destination = self.destinations[route.name]
            label = route.name
            if action == "tag":
                if tagged is None:
                    tagged_raw = tag_message(
                        raw, spam=work.is_spam, virus=work.has_virus, verdicts=verdicts
                    )
                    tagged = (tagged_raw, await asyncio.to_thread(parse_message, tagged_raw))
                data, message = tagged
            elif action == "quarantine":
                why = "virus" if work.has_virus and route.virus == "quarantine" else "spam"
                data = quarantine_copy(
                    raw, reason=f"{why} ({verdicts})", route=route.name, recipients=recipients
                )
                destination = self.quarantines[route.quarantine]
                label = f"{route.name} (quarantine)"
            await self._deliver_group(
                work, route, destination, label, action, data, message, recipients, rnd
            )

    async def _deliver_group(
        self,
        work: InboundWork,
        route: RouteSettings,
        destination: Destination,
        label: str,
        action: str,
        data: bytes,
        message: ParsedMessage,
        recipients: list[str],
        rnd: _Round,
    ) -> None:
        """One delivery to one destination; sorts its recipients into done, pending and
        failed (an empty `recipients` is the catch-all delivery of a message without any)."""
        started = time.monotonic()
        result: str | UpstreamError
        try:
            result = await destination.deliver(
                data, message, recipients, sender=work.source, delivery_id=work.dedupe_key
            )
        except UpstreamError as exc:
            result = exc
        except Exception as exc:  # a bug in a destination must not lose the message
            log.exception("destination %s raised unexpectedly", label)
            result = TransientError(
                f"internal error in destination {label}: {type(exc).__name__}: {exc}"
            )
        attempt: dict[str, Any] = {
            "destination": label,
            "destination_type": destination.type_name,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "recipients": list(recipients),
        }
        if action != "deliver":
            attempt["action"] = action
        if isinstance(result, str):
            attempt.update(
                outcome="quarantined" if action == "quarantine" else "delivered", result=result
            )
            rnd.delivered.append(
                {"route": route.name, "destination": label, "recipients": list(recipients)}
            )
            rnd.events.append((EventType.ATTEMPT, self.clock(), attempt))
            return

        permanent = isinstance(result, PermanentError) and not result.upstream_wide
        attempt["reason"] = result.reason
        if result.ambiguous:
            attempt["ambiguous"] = True
        if isinstance(result, PartialDelivery):
            attempt.update(outcome="partial", delivered=list(result.delivered))
            rnd.delivered.append(
                {"route": route.name, "destination": label, "recipients": list(result.delivered)}
            )
            for rcpt, refusal in result.refused.items():
                if refusal.permanent:
                    rnd.failed[rcpt] = refusal.reason
                else:
                    rnd.pending.append(rcpt)
                    rnd.last_error = f"{label}: {rcpt}: {refusal.reason}"
        elif permanent:
            attempt["outcome"] = "permanent"
            rnd.failed.update(dict.fromkeys(recipients, result.reason))
            if not recipients:
                rnd.whole_failure = result.reason
        else:
            attempt["outcome"] = "transient"
            rnd.pending.extend(recipients)
            rnd.retry_whole = rnd.retry_whole or not recipients
            rnd.last_error = result.reason
            if isinstance(result, TransientError) and result.retry_after is not None:
                rnd.retry_after = max(rnd.retry_after or 0.0, result.retry_after)
        rnd.events.append((EventType.ATTEMPT, self.clock(), attempt))

    # -- recording the outcome -------------------------------------------------------------

    async def _fail_whole(self, item: Claimed, rnd: _Round, reason: str) -> None:
        """The message itself can't be delivered (gone, undecryptable, unreadable)."""
        rnd.failed.update(dict.fromkeys(rnd.pending, reason))
        rnd.pending = []
        rnd.retry_whole = False
        rnd.whole_failure = reason
        await self._finish(item, rnd)

    async def _finish(self, item: Claimed, rnd: _Round) -> None:
        """Write the round's events and the new state in one transaction."""
        now = self.clock()
        rounds = item.attempts + 1
        pending = list(rnd.pending)
        failed = dict(rnd.failed)
        whole_failure = rnd.whole_failure
        retrying = bool(pending) or rnd.retry_whole
        reason = rnd.last_error or "delivery failed"
        next_at: float | None = None
        if retrying:
            next_at = self.policy.next_attempt(
                now=now,
                created=item.window_start,
                deferrals=rounds - 1,
                retry_after=rnd.retry_after,
            )
            if next_at is None:
                gave_up = self.policy.gave_up(
                    now=now, created=item.window_start, rounds=rounds, last_error=reason
                )
                failed.update(dict.fromkeys(pending, gave_up))
                if rnd.retry_whole:
                    whole_failure = gave_up
                pending, retrying = [], False
        # Recipients that failed for good in earlier rounds keep the work "failed" at the end.
        all_failed: dict[str, str] = {**(item.meta.get("rcpts_failed") or {}), **failed}
        summary = whole_failure or "; ".join(f"{r}: {why}" for r, why in all_failed.items())
        if not whole_failure and all_failed:
            original = item.meta.get("rcpts_original") or []
            if rnd.delivered or len(original) > len(all_failed):
                summary = f"partly delivered; failed: {summary}"

        rnd_record = Round(
            events=rnd.events,
            delivered=rnd.delivered,
            failed=all_failed,
            new_failures=bool(failed),
            retry=retrying,
            pending=tuple(pending),
            next_attempt=next_at or now,
            reason=reason,
            failure=summary or None,
            fail_detail={"recipients": all_failed} if all_failed else {},
            sent_detail={"outcome": "delivered", "deliveries": rnd.delivered},
        )
        recorded = await record_outcome(self.queue, item, now=now, rounds=rounds, rnd=rnd_record)
        if self.on_finish is not None:
            self.on_finish()
        if recorded and self.telemetry is not None:
            self.telemetry.inbound_round(
                deferred=retrying, failed=bool(summary), queue_time=now - item.created
            )
        fields: dict[str, Any] = {
            "msg_id": item.id,
            "direction": "inbound",
            "round": rounds,
            "destinations": sorted({str(d["destination"]) for d in rnd.delivered}) or None,
        }
        if retrying:
            log.info(
                "inbound %s deferred: %s",
                item.id,
                reason,
                extra={
                    **fields,
                    "event": "deferred",
                    "recipients": pending or None,
                    "reason": reason,
                    "next_attempt": time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(next_at or now)
                    ),
                },
            )
        elif summary:
            log.warning(
                "inbound %s failed: %s",
                item.id,
                summary,
                extra={
                    **fields,
                    "event": "failed",
                    "recipients": list(all_failed) or None,
                    "reason": summary,
                    "delay_ms": round((now - item.created) * 1000),
                },
            )
        else:
            log.info(
                "inbound %s delivered via %s",
                item.id,
                ", ".join(str(d["destination"]) for d in rnd.delivered),
                extra={
                    **fields,
                    "event": "delivered",
                    "recipients": [r for d in rnd.delivered for r in d["recipients"]] or None,
                    "delay_ms": round((now - item.created) * 1000),
                },
            )
