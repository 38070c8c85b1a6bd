"""The relay's Prometheus counters and histograms, and where their values live.

Two homes, chosen per process when `Telemetry` is made:

- Multiprocess (`relay serve` with `server.workers` > 1): the supervisor sets
  PROMETHEUS_MULTIPROC_DIR before any worker exists (`relay.telemetry.multiprocess`), so
  prometheus_client keeps every value in a memory-mapped file per process in that
  directory, and a scrape of any worker adds up the files of all of them. The metric
  objects then belong to no registry: they only write their files.
- In-process (one worker, and the tests, which run several `Relay` objects in one
  process): each `Telemetry` has its own `CollectorRegistry`, so two relays in one
  process never share or double-register a metric, and each /metrics shows its own relay.
  prometheus_client's global REGISTRY is never used for that reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_TIME_BUCKETS = (
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
    259200.0,
)


class PromMetrics:
    """The metric objects; see the module docstring for `multiprocess_dir`."""

    def __init__(self, multiprocess_dir: str | None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry: CollectorRegistry | None = (
            None if multiprocess_dir else CollectorRegistry(auto_describe=True)
        )
        registry = self.registry
        self.sessions = Counter(
            "relay_smtp_sessions",
            "SMTP connections admitted, by listener (those refused at the connection limit"
            " are not counted).",
            ["listener"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "relay_smtp_auth_failures",
            "SMTP AUTH attempts refused (wrong user or password), by listener.",
            ["listener"],
            registry=registry,
        )
        self.received = Counter(
            "relay_messages_received",
            "Messages offered to the relay, by listener (or 'api') and result: accepted,"
            " deferred (4xx, the client retries) or refused_<class> (5xx, by the class of"
            " the enhanced status code).",
            ["listener", "result"],
            registry=registry,
        )
        self.attempts = Counter(
            "relay_delivery_attempts",
            "Hand-overs to an upstream, by upstream and outcome (accepted, transient,"
            " permanent, refused).",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "relay_delivery_duration_seconds",
            "How long one hand-over to an upstream took, by upstream.",
            ["upstream"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "relay_messages_finished",
            "Units of work that reached a final state, by kind (outbound, inbound) and"
            " state: sent, failed, or bounced (failed, and a bounce went to the sender).",
            ["kind", "state"],
            registry=registry,
        )
        self.deferred = Counter(
            "relay_messages_deferred",
            "Delivery rounds that ended with the work deferred for a later retry, by kind.",
            ["kind"],
            registry=registry,
        )
        self.queue_time = Histogram(
            "relay_queue_time_seconds",
            "From arrival to a final state (sent, failed or bounced), by kind.",
            ["kind"],
            buckets=QUEUE_TIME_BUCKETS,
            registry=registry,
        )
        self.inbound = Counter(
            "relay_inbound_notifications",
            "SES inbound notifications, by outcome: queued, duplicate, unusable (recorded"
            " as failed work), then delivered, deferred or failed.",
            ["outcome"],
            registry=registry,
        )
        self.provider_events = Counter(
            "relay_provider_events",
            "Events the providers' webhooks reported after hand-over (delivered, bounced,"
            " complained, dropped...), by upstream; event=unmatched: for no message here.",
            ["upstream", "event"],
            registry=registry,
        )
        self.requeued = Counter(
            "relay_requeued_recipients",
            "Recipients an upstream dropped for its own reasons, re-sent through another.",
            ["upstream"],
            registry=registry,
        )

    def collect(self) -> Iterable[Metric]:
        """The counters and histograms: of every worker process in multiprocess mode."""
        if self.multiprocess_dir:
            collector = MultiProcessCollector(None, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return cast(Iterable[Metric], collector.collect())  # type: ignore[no-untyped-call]
        assert self.registry is not None
        return self.registry.collect()
