"""What /metrics shows: the counters and histograms, and gauges read at scrape time.

The gauges are computed from the SHARED state when Prometheus asks, never kept by a
worker: queue sizes and the oldest message come from the queue, breaker, health, pause
and in-flight figures from the routing state every process reports to. So whichever
worker (or host) is scraped, the gauges are the same, and they are never stale by more
than the routing sync interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from relay.message import Status
from relay.queue.base import UpstreamShare, heal

#: The numbers of `relay_upstream_breaker_state`.
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


@dataclass(frozen=True)
class QueueFigures:
    counts: Mapping[str, int]
    oldest: float | None  # arrival time of the oldest waiting message
    # Events for the applications' webhooks, per hook: {"waiting": n, "dead": n}.
    webhooks: Mapping[str, Mapping[str, int]] | None = None


def gauges(
    *,
    queue: QueueFigures,
    upstreams: Sequence[str],
    shares: Mapping[str, UpstreamShare],
    now: float,
    half_life: float,
) -> list[Metric]:
    sizes = GaugeMetricFamily(
        "relay_queue_messages",
        "Units of work in the queue, by state (all processes and hosts).",
        labels=["state"],
    )
    for state in Status:
        sizes.add_metric([state.value], float(queue.counts.get(state.value, 0)))
    oldest = GaugeMetricFamily(
        "relay_queue_oldest_message_age_seconds",
        "Age of the oldest message still waiting (queued, deferred, sending or held);"
        " 0 when none waits.",
        value=0.0 if queue.oldest is None else max(0.0, now - queue.oldest),
    )
    health = GaugeMetricFamily(
        "relay_upstream_health",
        "Routing health score of each upstream, 0.01 (failing) to 1 (healthy).",
        labels=["upstream"],
    )
    breaker = GaugeMetricFamily(
        "relay_upstream_breaker_state",
        "Circuit breaker of each upstream: 0 closed, 1 half-open (probing), 2 open.",
        labels=["upstream"],
    )
    paused = GaugeMetricFamily(
        "relay_upstream_paused",
        "1 while an operator has paused the upstream (it takes no new attempts).",
        labels=["upstream"],
    )
    in_flight = GaugeMetricFamily(
        "relay_upstream_in_flight",
        "Delivery attempts in progress on each upstream, over all processes.",
        labels=["upstream"],
    )
    for name in upstreams:
        share = shares.get(name) or UpstreamShare(name, health_stamp=now)
        labels = [name]
        health.add_metric(
            labels, heal(share.health, share.health_stamp, now=now, half_life=half_life)
        )
        breaker.add_metric(labels, float(breaker_state(share, now)))
        paused.add_metric(labels, 1.0 if share.paused else 0.0)
        in_flight.add_metric(labels, float(share.in_flight))
    families: list[Metric] = [sizes, oldest, health, breaker, paused, in_flight]
    if queue.webhooks is not None:
        outbox = GaugeMetricFamily(
            "relay_webhook_events",
            "Events for the applications' webhooks in the outbox, by hook: waiting (to be"
            " posted or retried) and dead (given up after the hook's max_age).",
            labels=["hook", "state"],
        )
        for hook, counts in sorted(queue.webhooks.items()):
            for kind in ("waiting", "dead"):
                outbox.add_metric([hook, kind], float(counts.get(kind, 0)))
        families.append(outbox)
    return families


def breaker_state(share: UpstreamShare, now: float) -> int:
    """An open breaker whose cool-down is over lets the next attempt through as a probe:
    half-open, whether or not a process has said so yet."""
    probe = share.next_probe
    if probe is not None and probe <= now:
        return BREAKER_STATES["half-open"]
    return BREAKER_STATES.get(share.breaker, BREAKER_STATES["open"])


class _Families:
    """A collector over metric families already gathered (what the encoders take)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(families: Iterable[Metric], accept: str) -> tuple[bytes, str]:
    """The scrape's body and Content-Type: the Prometheus text format, or OpenMetrics when
    the scraper asks for it in `accept`."""
    encoder, content_type = choose_encoder(accept)
    return encoder(_Families(families)), content_type
