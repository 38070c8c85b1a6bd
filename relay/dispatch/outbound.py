"""One delivery round for an outbound message: failover across upstreams, then the outcome.

A round tries upstreams in routing order until every recipient is either accepted or
refused for good. A transient failure moves the remaining recipients to the next usable
upstream at once (never back to the one that just failed them); only when no usable
upstream is left is the message deferred, by the retry schedule. Permanent refusals are
not retried and produce a bounce (when a `bouncer` is configured).

Everything the round did is written to the timeline in the same transaction as the new
state, so the timeline never disagrees with the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from relay.dispatch.retry import RetryPolicy
from relay.dispatch.routing import Router
from relay.dispatch.scheduler import record_outcome
from relay.message import Claimed, EventType
from relay.outcomes import Accepted, PermanentError, TransientError, UpstreamError
from relay.queue.admin import wake_waiting
from relay.queue.base import Queue, Round
from relay.telemetry.core import BOUNCED, FAILED, SENT
from relay.upstreams.base import Upstream

if TYPE_CHECKING:
    from relay.telemetry.core import Telemetry

log = logging.getLogger("relay.dispatch")


class Signer(Protocol):
    def sign(
        self, data: bytes, *, envelope_from: str = "", skip_headers: Collection[str] = ()
    ) -> bytes: ...


#: Called with the message and {recipient: reason} of recipients that failed for good;
#: True when a bounce was queued to the sender.
Bouncer = Callable[[Claimed, dict[str, str]], Awaitable[bool]]
#: Whether a recipient must not be mailed for this sender: the reason, else None
#: (relay.suppression, with `[suppression] action = "bounce"`).
Suppressed = Callable[[str, str], str | None]
#: Told of every recorded round (relay.events publishes `sent`/`failed` to the apps).
RoundListener = Callable[[Claimed, Round], Awaitable[None]]


class OutboundWorker:
    def __init__(
        self,
        *,
        queue: Queue,
        router: Router,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.time,
        signer: Signer | None = None,
        bouncer: Bouncer | None = None,
        on_finish: Callable[[], None] | None = None,
        telemetry: Telemetry | None = None,
        keep_body_for: Collection[str] = (),
        suppressed: Suppressed | None = None,
        on_round: RoundListener | None = None,
    ) -> None:
        self.queue = queue
        self.router = router
        self.policy = policy
        self.clock = clock
        self.signer = signer
        self.bouncer = bouncer
        # Tests and the web page await this instead of polling the queue.
        self.on_finish = on_finish
        self.telemetry = telemetry
        # Upstreams whose event webhooks may report a drop after taking a message: the
        # body is kept (`[events] keep_body`) so the recipient can go out elsewhere.
        self.keep_body_for = frozenset(keep_body_for)
        self.suppressed = suppressed
        self.on_round = on_round

    async def process(self, item: Claimed) -> None:
        pending = list(item.envelope.rcpt_tos)
        failed: dict[str, str] = {}
        if self.suppressed is not None:
            for rcpt in pending:
                why = self.suppressed(rcpt, item.envelope.mail_from)
                if why is not None:
                    failed[rcpt] = why
            pending = [r for r in pending if r not in failed]
        delivered: list[dict[str, Any]] = []
        events: list[tuple[EventType, float, dict[str, Any]]] = []
        # Upstreams that dropped this message after taking it are never tried again for it.
        excluded = frozenset(item.meta.get("excluded_upstreams") or ())
        tried: set[str] = set(excluded)
        last_error: UpstreamError | None = None
        signed: dict[frozenset[str], bytes] = {}
        refusals: dict[str, str] = {}

        def accept(upstream: Upstream) -> bool:
            why = upstream.refusal(item.envelope.with_recipients(tuple(pending)), item.data)
            if why:
                refusals[upstream.name] = why
            return why is None

        looked_again = False
        # Every attempt of this round failed upstream-wide (or none was made): once the
        # round ends, the message waits for an upstream to come back, not for its own sake.
        waiting = True
        while pending:
            group = self.router.candidates(exclude=tried, accept=accept)
            if not group and tried == excluded and not looked_again:
                looked_again = True
                await self.router.refresh()
                continue
            if not group:
                if excluded and excluded >= {s.name for s in self.router.states}:
                    # Every upstream took it and dropped it: nowhere left to send it.
                    why = "dropped by every upstream (" + ", ".join(sorted(excluded)) + ")"
                    failed.update(dict.fromkeys(pending, why))
                    pending = []
                elif refusals and len(refusals) == len(self.router.states):
                    # Not an outage: no configured upstream can carry this message at all.
                    why = "; ".join(f"{n}: {r}" for n, r in sorted(refusals.items()))
                    failed.update(dict.fromkeys(pending, f"no upstream can take it ({why})"))
                    pending = []
                elif refusals:
                    events.append((EventType.NOTE, self.clock(), {"skipped": refusals}))
                break
            async with self.router.slot(group) as state:
                if state is None:
                    continue  # the group's probe failed meanwhile: look for others
                upstream = state.upstream
                tried.add(upstream.name)
                envelope = item.envelope.with_recipients(tuple(pending))
                data = await self._data_for(upstream, item, signed)
                started = time.monotonic()
                try:
                    result: Accepted | UpstreamError = await upstream.send(envelope, data)
                except UpstreamError as exc:
                    result = exc
                except Exception as exc:  # a bug in an upstream must not lose the message
                    log.exception("upstream %s raised unexpectedly", upstream.name)
                    result = TransientError(
                        f"internal error in upstream {upstream.name}: {type(exc).__name__}: {exc}"
                    )
                latency = time.monotonic() - started
                # Recorded before the slot is given back, so a half-open probe's verdict
                # is known to the messages waiting for it.
                message_fault = isinstance(result, PermanentError) and not result.upstream_wide
                waiting &= isinstance(result, UpstreamError) and result.upstream_wide
                if isinstance(result, Accepted):
                    self.router.record_success(state, latency)
                else:
                    self.router.record_failure(
                        state,
                        result,
                        latency,
                        message_fault=message_fault or result.sender_scoped,
                    )

            attempt: dict[str, Any] = {
                "upstream": upstream.name,
                "duration_ms": round(latency * 1000, 1),
                "recipients": list(pending),
            }
            if isinstance(result, Accepted):
                accepted = [r for r in pending if r not in result.refused]
                attempt.update(
                    outcome="accepted" if accepted else "refused", provider_id=result.provider_id
                )
                if result.refused:
                    attempt["refused"] = {r: x.reason for r, x in result.refused.items()}
                if accepted:
                    delivered.append(
                        {
                            "upstream": upstream.name,
                            "provider_id": result.provider_id,
                            "recipients": accepted,
                        }
                    )
                for rcpt, refusal in result.refused.items():
                    if refusal.permanent:
                        failed[rcpt] = refusal.reason
                pending = [
                    r for r in pending if r in result.refused and not result.refused[r].permanent
                ]
                if pending:
                    last_error = TransientError(
                        "; ".join(f"{r}: {result.refused[r].reason}" for r in pending)
                    )
            else:
                attempt.update(
                    outcome="permanent" if message_fault else "transient", reason=result.reason
                )
                if result.ambiguous:
                    attempt["ambiguous"] = True
                if result.upstream_wide:
                    attempt["upstream_wide"] = True
                if message_fault:
                    failed.update(dict.fromkeys(pending, result.reason))
                    pending = []
                else:
                    last_error = result
            events.append((EventType.ATTEMPT, self.clock(), attempt))
            if log.isEnabledFor(logging.INFO):
                _log_attempt(item.id, attempt)
            if self.telemetry is not None:
                self.telemetry.attempt(upstream.name, attempt["outcome"], latency)

        await self._finish(
            item,
            pending=pending,
            failed=failed,
            delivered=delivered,
            events=events,
            tried=tried - excluded,
            last_error=last_error,
            waiting=waiting,
        )

    async def _data_for(
        self, upstream: Upstream, item: Claimed, signed: dict[frozenset[str], bytes]
    ) -> bytes:
        """The bytes to hand over: DKIM-signed where the upstream keeps them intact. One
        signature per set of headers to leave out, shared by the upstreams that agree."""
        if self.signer is None or not upstream.should_dkim_sign(item.data):
            return item.data
        skip = upstream.dkim_skip_headers
        if skip not in signed:
            # RSA signing is CPU work: keep it off the event loop.
            signed[skip] = await asyncio.to_thread(
                self.signer.sign,
                item.data,
                envelope_from=item.envelope.mail_from,
                skip_headers=skip,
            )
        return signed[skip]

    async def _finish(
        self,
        item: Claimed,
        *,
        pending: list[str],
        failed: dict[str, str],
        delivered: list[dict[str, Any]],
        events: list[tuple[EventType, float, dict[str, Any]]],
        tried: set[str],
        last_error: UpstreamError | None,
        waiting: bool,
    ) -> None:
        now = self.clock()
        rounds = item.attempts + 1
        new_failures = dict(failed)
        all_rcpts = item.meta.get("rcpts_original") or list(item.envelope.rcpt_tos)
        next_at: float | None = None
        # Never just "none available": name each upstream's state and last real error. A
        # message waiting for an upstream says so (NO_UPSTREAM), and a recovery wakes it.
        reason = self.router.why_none() if waiting or not last_error else last_error.reason
        if pending:
            retry_after = last_error.retry_after if isinstance(last_error, TransientError) else None
            next_at = self.policy.next_attempt(
                now=now, created=item.window_start, deferrals=rounds - 1, retry_after=retry_after
            )
            if next_at is not None and waiting and retry_after is None:
                next_at = self.router.retry_at(next_at, now=now)
            if next_at is None:
                age_reason = self.policy.gave_up(
                    now=now, created=item.window_start, rounds=rounds, last_error=reason
                )
                failed.update(dict.fromkeys(pending, age_reason))
                new_failures.update(dict.fromkeys(pending, age_reason))
                pending = []
        # Recipients refused for good in earlier rounds keep the message "failed" at the end.
        failed = {**item.meta.get("rcpts_failed", {}), **failed}
        failure: str | None = None
        if failed and not pending:
            failure = "; ".join(f"{r}: {why}" for r, why in failed.items())
            if len(failed) < len(all_rcpts):
                failure = (
                    f"{len(all_rcpts) - len(failed)} of {len(all_rcpts)} "
                    f"recipients delivered; failed: {failure}"
                )
        rnd = Round(
            events=events,
            delivered=delivered,
            failed=failed,
            new_failures=bool(new_failures),
            retry=bool(pending),
            pending=tuple(pending),
            next_attempt=next_at or now,
            reason=reason,
            failure=failure,
            defer_detail={"tried": sorted(tried)},
            fail_detail={"recipients": failed},
            sent_detail={"deliveries": delivered},
            keep_body=any(d["upstream"] in self.keep_body_for for d in delivered),
        )
        recorded = await record_outcome(self.queue, item, now=now, rounds=rounds, rnd=rnd)
        if recorded and self.on_round is not None:
            try:
                await self.on_round(item, rnd)
            except Exception:  # telling the apps must never undo or stall a delivery
                log.exception("%s: the round's events were not passed on", item.id)
        if self.on_finish is not None:
            self.on_finish()
        if pending:
            log.info(
                "%s deferred until %s: %s",
                item.id,
                _iso(next_at or now),
                reason,
                extra={
                    "event": "deferred",
                    "msg_id": item.id,
                    "recipients": pending,
                    "reason": reason,
                    "next_attempt": _iso(next_at or now),
                    "round": rounds,
                    "tried": sorted(tried),
                },
            )
        elif failed:
            log.warning(
                "%s failed: %s",
                item.id,
                "; ".join(failed.values()),
                extra={
                    "event": "failed",
                    "msg_id": item.id,
                    "recipients": list(failed),
                    "reason": failure,
                    "failures": failed,
                    "round": rounds,
                    "delay_ms": round((now - item.created) * 1000),
                },
            )
        elif log.isEnabledFor(logging.INFO):  # the common case: its fields only when read
            log.info(
                "%s sent via %s",
                item.id,
                ", ".join(f"{d['upstream']} ({d['provider_id']})" for d in delivered),
                extra=_sent_fields(item, delivered, now=now, rounds=rounds),
            )
        bounced = False
        if new_failures and self.bouncer is not None:
            bounced = await self.bouncer(item, new_failures)
        if recorded and self.telemetry is not None:
            if pending:
                self.telemetry.deferred(item.kind.value)
            else:
                state = (BOUNCED if bounced else FAILED) if failure is not None else SENT
                self.telemetry.finished(item.kind.value, state, now - item.created)


#: After a recovery's wake-up, the rounds that found no upstream just before it may still
#: be committing their deferrals: a second wake-up this much later takes those too.
WAKE_AGAIN_AFTER = 2.0


async def wake_after_recoveries(
    router: Router, queue: Queue, clock: Callable[[], float] = time.time
) -> None:
    """Runs beside the dispatcher: when a probe here succeeds, the messages waiting for an
    upstream (deferred with NO_UPSTREAM) are due at once, not at their next retry step."""
    async for names in router.recoveries():
        actor = f"routing ({', '.join(names)} back)"
        await wake_waiting(queue, now=clock(), actor=actor)
        await asyncio.sleep(WAKE_AGAIN_AFTER)
        await wake_waiting(queue, now=clock(), actor=actor)


def _log_attempt(msg_id: str, attempt: dict[str, Any]) -> None:
    """Postfix's one line per delivery attempt: which upstream, what came of it, how long
    it took, and the provider's id or the reason."""
    why = attempt.get("reason") or ""
    if attempt.get("refused"):
        why = "; ".join(f"{r}: {x}" for r, x in attempt["refused"].items())
    log.info(
        "%s attempt via %s: %s in %.0f ms, %d recipient(s)%s%s",
        msg_id,
        attempt["upstream"],
        attempt["outcome"],
        attempt["duration_ms"],
        len(attempt["recipients"]),
        f", id {attempt['provider_id']}" if attempt.get("provider_id") else "",
        f": {why}" if why else "",
        extra={"event": "attempt", "msg_id": msg_id, **attempt},
    )


def _sent_fields(
    item: Claimed, delivered: list[dict[str, Any]], *, now: float, rounds: int
) -> dict[str, Any]:
    """The `sent` line's fields: one upstream and provider id as plain fields (the common
    case, what a log query filters on), every hand-over when recipients went apart."""
    fields: dict[str, Any] = {
        "event": "sent",
        "msg_id": item.id,
        "recipients": [r for d in delivered for r in d["recipients"]],
        "round": rounds,
        "delay_ms": round((now - item.created) * 1000),
    }
    if len(delivered) == 1:
        fields["upstream"] = delivered[0]["upstream"]
        fields["provider_id"] = delivered[0]["provider_id"]
    else:
        fields["deliveries"] = delivered
    return fields


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
