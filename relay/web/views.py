"""Read models of the operator surface: what the API answers and the admin page renders.

One copy for both doors, so the page never shows something the API would say otherwise.
Every function returns JSON-ready dicts; times are epoch seconds (floats). Everything is
read from the queue and its shared routing and stats state, never from this process's
memory, so the answers cover every worker process (and, on PostgreSQL, every host).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from relay.events.model import TIMELINE_TYPE
from relay.message import SUMMARY_HEADERS, WAITING, EventType, header_summary
from relay.queue.base import STATUS_RANK, MessageQuery, MessageRow, UpstreamShare, heal
from relay.telemetry.stats import provider_event_windows, upstream_windows, window_stats
from relay.web.context import WebContext

#: The `window` values of the stats endpoint, in seconds.
WINDOWS: dict[str, float] = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
#: How much of a header the detail view shows while the body is stored.
MAX_HEADER_TEXT = 1000


def message_summary(row: MessageRow) -> dict[str, Any]:
    """One line of the message list."""
    meta = row.meta
    return {
        "id": row.id,
        "kind": row.kind,
        "state": row.state,
        "from": row.mail_from,
        "to": list(meta.get("rcpts_original") or row.rcpts),
        "subject": meta.get("subject"),
        "size": row.size,
        "created": row.created,
        "updated": row.updated,
        "attempts": row.attempts,
        "upstream": meta.get("upstream"),
        "last_error": row.last_error,
    }


async def message_page(ctx: WebContext, query: MessageQuery) -> dict[str, Any]:
    """A page of search results. One row more than asked for is read to know whether a
    next page exists, so `next_cursor` is None exactly on the last page."""
    rows = await ctx.queue.find(dataclasses.replace(query, limit=query.limit + 1))
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return {
        "messages": [message_summary(r) for r in page],
        "next_cursor": page[-1].id if more and page else None,
    }


async def message_detail(ctx: WebContext, msg_id: str) -> dict[str, Any] | None:
    """Everything about one message: where it is, what happened to each recipient, and its
    timeline. None when there is no such message (never stored, deleted or purged)."""
    row = await ctx.queue.get(msg_id)
    if row is None:
        return None
    timeline = await ctx.queue.timeline(msg_id)
    body = await ctx.queue.body(msg_id)
    now = ctx.clock()
    detail = message_summary(row)
    detail.update(
        recipients=recipient_outcomes(row, timeline),
        headers=headers_of(row, body),
        body_stored=body is not None,
        queue_time=_queue_time(row, timeline, now),
        next_attempt=row.next_attempt if row.state in ("queued", "deferred") else None,
        provider_id=row.meta.get("provider_id"),
        tags=row.meta.get("tags"),
        timeline=timeline,
    )
    return detail


#: What the providers' events may say of a recipient after hand-over (meta.rcpts_status).
PROVIDER_STATES = tuple(STATUS_RANK)
#: Timeline types of the providers' events, whose reason the recipient row shows.
_PROVIDER_EVENTS = frozenset(TIMELINE_TYPE.values()) | {EventType.REQUEUED}


def recipient_outcomes(row: MessageRow, timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per original recipient: pending, sent (an upstream took it), failed, or what the
    provider reported since (delivered, delayed, bounced, complained, dropped, rejected,
    unsubscribed, requeued), with the upstream, provider id and reason.

    The queue's meta (`rcpts_done`, `rcpts_failed`, `rcpts_status`) is the record; accepted
    attempts on the timeline fill in for messages stored before meta carried it."""
    original = list(row.meta.get("rcpts_original") or row.rcpts)
    outcome: dict[str, dict[str, Any]] = {
        r: {
            "address": r,
            "state": "pending",
            "upstream": None,
            "provider_id": None,
            "reason": None,
            "at": None,
        }
        for r in original
    }
    reported: dict[str, str | None] = {}
    for event in timeline:
        kind = event.get("type")
        if kind == EventType.ATTEMPT and event.get("outcome") == "accepted":
            refused = event.get("refused") or {}
            for rcpt in event.get("recipients") or ():
                if rcpt in outcome and rcpt not in refused:
                    outcome[rcpt].update(
                        state="sent",
                        upstream=event.get("upstream"),
                        provider_id=event.get("provider_id"),
                        at=event.get("at"),
                        reason=None,
                    )
        elif kind in _PROVIDER_EVENTS:
            for rcpt in event.get("recipients") or [event.get("recipient")]:
                reported[rcpt] = event.get("reason")
    done = row.meta.get("rcpts_done") or {}
    for rcpt, took in done.items():
        if rcpt in outcome and outcome[rcpt]["state"] == "pending":
            outcome[rcpt].update(
                state="sent",
                upstream=took.get("upstream"),
                provider_id=took.get("provider_id"),
                at=took.get("at"),
            )
    for rcpt, status in (row.meta.get("rcpts_status") or {}).items():
        if rcpt not in outcome:
            continue
        took_again = (done.get(rcpt) or {}).get("at") or 0.0
        if status.get("status") == "requeued" and took_again > (status.get("at") or 0.0):
            continue  # handed over again since: "sent" by the new upstream
        outcome[rcpt].update(
            state=status.get("status"), at=status.get("at"), reason=reported.get(rcpt)
        )
    for rcpt, reason in (row.meta.get("rcpts_failed") or {}).items():
        if rcpt in outcome:
            outcome[rcpt].update(state="failed", reason=reason)
    if row.state == "sent":
        # A sent message delivered everyone not failed, whatever the record lacks.
        for item in outcome.values():
            if item["state"] == "pending":
                item.update(state="sent", upstream=row.meta.get("upstream"))
    return list(outcome.values())


def headers_of(row: MessageRow, body: bytes | None) -> dict[str, str | None] | None:
    """SUMMARY_HEADERS as they arrived: read from the stored body, or, once the body is
    gone (dropped when sent), from the summary kept in meta at arrival (both made by
    `relay.message.header_summary`). None for a bodiless message stored before the relay
    kept that summary."""
    found: dict[str, Any]
    if body is not None:
        found = header_summary(body, limit=MAX_HEADER_TEXT)
    else:
        kept = row.meta.get("headers")
        if not isinstance(kept, dict):
            return None
        found = {**kept, "Subject": row.meta.get("subject")}
    return {name: found.get(name) for name in SUMMARY_HEADERS}


def _queue_time(row: MessageRow, timeline: list[dict[str, Any]], now: float) -> float:
    """Seconds from arrival until it left the queue (sent or failed), or until now."""
    if row.state in ("sent", "failed"):
        ends = [
            float(e["at"]) for e in timeline if e.get("type") in (EventType.SENT, EventType.FAILED)
        ]
        end = ends[-1] if ends else row.updated
    else:
        end = now
    return max(0.0, end - row.created)


# -- upstreams ---------------------------------------------------------------------------


async def upstream_rows(ctx: WebContext) -> list[dict[str, Any]]:
    """Every configured upstream with its shared routing state (what each process last
    reported) and its attempts, successes and latency over the last 5 minutes and hour."""
    now = ctx.clock()
    shares = await ctx.admin.upstreams()
    windows = await upstream_windows(ctx.queue.stats, now=now)
    reports = await provider_event_windows(ctx.queue.stats, now=now)
    half_life = ctx.config.routing.health_half_life
    rows = []
    for up in sorted(ctx.config.upstream, key=lambda u: (u.priority, u.name)):
        share = shares.get(up.name) or UpstreamShare(up.name, health_stamp=now)
        rows.append(
            {
                "name": up.name,
                "type": up.type,
                "priority": up.priority,
                "weight": up.weight,
                "max_rate": up.max_rate,
                "health": round(
                    heal(share.health, share.health_stamp, now=now, half_life=half_life), 3
                ),
                "breaker": share.breaker,
                "next_probe": share.next_probe,
                "paused": share.paused,
                "in_flight": share.in_flight,
                "last_error": share.last_error,
                "latency_ewma": share.latency_ewma,
                "attempts": share.attempts,
                "successes": share.successes,
                "failures": share.failures,
                "windows": windows.get(up.name) or {"5m": _empty_window(), "1h": _empty_window()},
                "events_enabled": up.events,
                "events": reports.get(up.name) or {},
            }
        )
    return rows


def _empty_window() -> dict[str, Any]:
    return {
        "attempts": 0,
        "successes": 0,
        "failures": 0,
        "success_rate": None,
        "latency_p50": None,
        "latency_p95": None,
    }


# -- stats and the overview ------------------------------------------------------------


async def _oldest_age(ctx: WebContext, now: float) -> float | None:
    oldest = await ctx.queue.oldest(states=WAITING)
    return None if oldest is None else max(0.0, now - oldest)


async def stats(ctx: WebContext, window: str) -> dict[str, Any]:
    """The stats endpoint: counts by state, the oldest waiting message, and the window's
    series, queue-time percentiles, per-upstream rates and inbound counts."""
    now = ctx.clock()
    counted = await window_stats(ctx.queue.stats, window=WINDOWS[window], now=now)
    figures = counted.as_dict()
    return {
        "window": window,
        "counts": await ctx.queue.counts(),
        "oldest_age": await _oldest_age(ctx, now),
        **figures,
        "slowest_upstream": slowest_upstream(figures.get("upstreams") or {}),
    }


def slowest_upstream(upstreams: dict[str, dict[str, Any]]) -> str | None:
    """The upstream with the highest p95 latency in the window (None without data)."""
    timed = [
        (float(figures["latency_p95"]), name)
        for name, figures in upstreams.items()
        if figures.get("latency_p95") is not None
    ]
    return max(timed)[1] if timed else None


async def overview(ctx: WebContext) -> dict[str, Any]:
    """The admin page's first screen, in one read."""
    now = ctx.clock()
    hour = (await window_stats(ctx.queue.stats, window=WINDOWS["1h"], now=now)).as_dict()
    day = (await window_stats(ctx.queue.stats, window=WINDOWS["24h"], now=now)).as_dict()
    failures = await ctx.queue.find(MessageQuery(state="failed", limit=10))
    return {
        "counts": await ctx.queue.counts(),
        "oldest_age": await _oldest_age(ctx, now),
        "throughput_1h": hour["series"],
        "throughput_24h": day["series"],
        "queue_time": hour["queue_time"],
        "queue_time_24h": day["queue_time"],
        "upstreams": await upstream_rows(ctx),
        "slowest_upstream": slowest_upstream(hour.get("upstreams") or {}),
        "recent_failures": [message_summary(r) for r in failures],
        "inbound": day["inbound"],
    }
