"""Reading the shared per-minute stats back: windows of counts, rates and percentiles.

What the stats API, the overview page and the upstream table show. The cells come from
every process and host (`StatsStore`), so the figures are the whole relay's.

Percentiles are estimated from the fixed log-scale buckets of `relay.telemetry.series`:
the estimate is the geometric midpoint of the bucket that holds the nearest-rank sample
(the ceil(q * n)-th smallest), so for values of 1 ms and more it is within a factor
sqrt(2 ** 0.25) of that sample: at most 9.1 % off. Values under 1 ms are reported as
0.5 ms. "max" is the same estimate for the largest sample. Without samples, None.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.message import Kind
from relay.queue.base import StatPoint, StatsStore
from relay.telemetry import series

#: About this many intervals in a window's series (one a minute for an hour).
INTERVALS = 60
UPSTREAM_WINDOWS = {"5m": 5, "1h": 60}  # name -> minutes
FAILURE_OUTCOMES = frozenset({"transient", "permanent", "refused"})


def percentile(buckets: Mapping[int, float], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a histogram {bucket index: count} (see the module
    docstring for its precision)."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = max(1.0, math.ceil(q * total - 1e-9))
    seen = 0.0
    ordered = sorted(i for i, n in buckets.items() if n > 0)
    for index in ordered:
        seen += buckets[index]
        if seen >= rank:
            return series.bucket_value(index)
    return series.bucket_value(ordered[-1])


def highest(buckets: Mapping[int, float]) -> float | None:
    filled = [i for i, n in buckets.items() if n > 0]
    return series.bucket_value(max(filled)) if filled else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class UpstreamCounts:
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    latency: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def count(self, outcome: str, n: float) -> None:
        self.attempts += int(n)
        if outcome == "accepted":
            self.successes += int(n)
        elif outcome in FAILURE_OUTCOMES:
            self.failures += int(n)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "successes": self.successes,
            "failures": self.failures,
            "success_rate": round(self.successes / self.attempts, 4) if self.attempts else None,
            "latency_p50": _rounded(percentile(self.latency, 0.50), 4),
            "latency_p95": _rounded(percentile(self.latency, 0.95), 4),
        }


def _upstream_counts(points: Iterable[StatPoint]) -> dict[str, UpstreamCounts]:
    found: dict[str, UpstreamCounts] = defaultdict(UpstreamCounts)
    for p in points:
        if p.series == series.ATTEMPT:
            name, outcome = series.split_label(p.label)
            found[name].count(outcome, p.value)
        elif p.series == series.LATENCY:
            found[p.label].latency[p.bucket] += p.value
    return found


@dataclass
class WindowStats:
    since: float
    until: float
    step: float
    series: list[dict[str, Any]]
    queue_time: dict[str, float | None]
    upstreams: dict[str, dict[str, Any]]
    inbound: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "step": self.step,
            "series": self.series,
            "queue_time": self.queue_time,
            "upstreams": self.upstreams,
            "inbound": self.inbound,
        }


def _layout(window: float, now: float) -> tuple[int, int, int]:
    """(first minute, end minute, minutes per interval): whole-minute intervals ending
    with the minute in progress."""
    window_minutes = max(1, math.ceil(window / 60))
    step = max(1, round(window_minutes / INTERVALS))
    intervals = math.ceil(window_minutes / step)
    end = int(now // 60) + 1
    return end - intervals * step, end, step


async def window_stats(store: StatsStore, *, window: float, now: float) -> WindowStats:
    """The relay's figures over the `window` seconds up to `now`: counts per interval
    (about 60), time in queue of outbound messages, per-upstream attempts and latency,
    inbound notifications."""
    first, end, step = _layout(window, now)
    points = await store.read(since=first * 60, until=end * 60)
    intervals = [
        {
            "start": float((first + i * step) * 60),
            "received": 0,
            "sent": 0,
            "deferred": 0,
            "failed": 0,
        }
        for i in range((end - first) // step)
    ]
    queue_time: dict[int, float] = defaultdict(float)
    inbound = {"received": 0, "delivered": 0, "failed": 0}
    outbound_final = {
        f"{Kind.OUTBOUND.value}:sent": "sent",
        f"{Kind.OUTBOUND.value}:failed": "failed",
        f"{Kind.OUTBOUND.value}:bounced": "failed",
    }
    inbound_outcomes = {
        "queued": "received",
        "unusable": "received",
        "delivered": "delivered",
        "failed": "failed",
    }
    for p in points:
        if not first <= p.minute < end:
            continue
        slot = intervals[(p.minute - first) // step]
        n = int(p.value)
        if p.series == series.RECEIVED and p.label == "accepted":
            slot["received"] += n
        elif p.series == series.FINISHED and p.label in outbound_final:
            slot[outbound_final[p.label]] += n
        elif p.series == series.DEFERRED and p.label == Kind.OUTBOUND.value:
            slot["deferred"] += n
        elif p.series == series.QUEUE_TIME and p.label == Kind.OUTBOUND.value:
            queue_time[p.bucket] += p.value
        elif p.series == series.INBOUND and p.label in inbound_outcomes:
            inbound[inbound_outcomes[p.label]] += n
    upstreams = {
        name: counts.as_dict() for name, counts in sorted(_upstream_counts(points).items())
    }
    return WindowStats(
        since=float(first * 60),
        until=float(end * 60),
        step=float(step * 60),
        series=intervals,
        queue_time={
            "p50": _rounded(percentile(queue_time, 0.50), 3),
            "p95": _rounded(percentile(queue_time, 0.95), 3),
            "p99": _rounded(percentile(queue_time, 0.99), 3),
            "max": _rounded(highest(queue_time), 3),
        },
        upstreams=upstreams,
        inbound=inbound,
    )


async def upstream_windows(
    store: StatsStore, *, now: float
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per upstream, its attempts, successes, failures, success rate and latency p50/p95
    over the last 5 minutes and the last hour (each ending with the minute in progress)."""
    end = int(now // 60) + 1
    longest = max(UPSTREAM_WINDOWS.values())
    points = await store.read(
        since=(end - longest) * 60, until=end * 60, series=(series.ATTEMPT, series.LATENCY)
    )
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for window, minutes in UPSTREAM_WINDOWS.items():
        recent = [p for p in points if end - minutes <= p.minute < end]
        for name, counts in _upstream_counts(recent).items():
            result.setdefault(name, {})[window] = counts.as_dict()
    empty = UpstreamCounts().as_dict()
    for windows in result.values():
        for window in UPSTREAM_WINDOWS:
            windows.setdefault(window, dict(empty))
    return result


#: Windows of the providers' reports: bounces and complaints come hours after hand-over,
#: and the rates providers suspend accounts on are taken over a day's volume or more.
EVENT_WINDOWS = {"1h": 60, "24h": 1440}
#: The provider events counted per upstream (`Telemetry.provider_event` names).
EVENT_NAMES = (
    "delivered",
    "deferred",
    "hard_bounce",
    "soft_bounce",
    "complained",
    "dropped",
    "rejected",
    "unsubscribed",
    "unmatched",
)


async def provider_event_windows(
    store: StatsStore, *, now: float
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per upstream and window (EVENT_WINDOWS): its providers' events by name, recipients
    requeued from it, messages it accepted, and the bounce (hard bounces) and complaint
    rates over what it accepted in the window, as SES computes them (None before it took
    anything)."""
    end = int(now // 60) + 1
    longest = max(EVENT_WINDOWS.values())
    points = await store.read(
        since=(end - longest) * 60,
        until=end * 60,
        series=(series.PROVIDER_EVENT, series.REQUEUED, series.ATTEMPT),
    )
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for window, minutes in EVENT_WINDOWS.items():
        counts: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(EVENT_NAMES, 0.0))
        for p in points:
            if not end - minutes <= p.minute < end:
                continue
            if p.series == series.PROVIDER_EVENT:
                name, event = series.split_label(p.label)
                counts[name][event] = counts[name].get(event, 0.0) + p.value
            elif p.series == series.REQUEUED:
                counts[p.label]["requeued"] = counts[p.label].get("requeued", 0.0) + p.value
            else:
                name, outcome = series.split_label(p.label)
                if outcome == "accepted":
                    counts[name]["accepted"] = counts[name].get("accepted", 0.0) + p.value
        for name, found in counts.items():
            accepted = found.pop("accepted", 0.0)
            row: dict[str, Any] = {k: int(v) for k, v in found.items()}
            row.setdefault("requeued", 0)
            row["accepted"] = int(accepted)
            row["bounce_rate"] = _rate(found["hard_bounce"], accepted)
            row["complaint_rate"] = _rate(found["complained"], accepted)
            result.setdefault(name, {})[window] = row
    return result


def _rate(part: float, whole: float) -> float | None:
    return round(part / whole, 5) if whole else None
