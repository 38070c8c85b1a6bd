"""Per-minute stats: counted in memory, added to the shared StatsStore, read back as
windows. Two processes (two writers on one store) add up; a store that is down loses
nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.queue.base import StatPoint, StatsStore, StoreError
from relay.queue.sqlite.engine import SQLiteQueue
from relay.telemetry import series
from relay.telemetry.core import BOUNCED, FAILED, SENT, Telemetry
from relay.telemetry.stats import upstream_windows, window_stats

NOW = 1_700_000_000.0  # a fixed wall clock: minute 28333333


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def two_writers(tmp_path: Path) -> AsyncIterator[tuple[SQLiteQueue, SQLiteQueue]]:
    """Two worker processes' queues on one queue directory: one stats table."""
    queues = tuple(
        SQLiteQueue(tmp_path / "queue", owner=f"test:{i}", shard=i, workers=2) for i in range(2)
    )
    yield queues  # type: ignore[misc]
    for queue in queues:
        await queue.close()


async def test_window_stats_add_up_what_two_processes_counted(
    two_writers: tuple[SQLiteQueue, SQLiteQueue],
) -> None:
    clock = Clock()
    a, b = (Telemetry(q.stats, clock=clock, multiprocess_dir="") for q in two_writers)
    for _ in range(3):
        a.message_received("127.0.0.1:25", "accepted")
    b.message_received("127.0.0.1:25", "accepted")
    b.message_received("127.0.0.1:25", "refused_policy")  # not "received" on the chart
    a.attempt("ses", "transient", 2.0)
    a.attempt("outbox", "accepted", 0.1)
    b.attempt("outbox", "accepted", 0.1)
    b.attempt("outbox", "accepted", 0.2)
    b.attempt("ses", "accepted", 0.4)
    a.finished("outbound", SENT, 1.0)
    b.finished("outbound", SENT, 2.0)
    b.finished("outbound", SENT, 4.0)
    a.finished("outbound", FAILED, 60.0)
    b.finished("outbound", BOUNCED, 120.0)
    a.deferred("outbound")
    b.inbound("queued")
    a.inbound("unusable")
    b.inbound_round(deferred=False, failed=False, queue_time=3.0)
    clock.now += 120  # two minutes later: the next interval
    a.message_received("127.0.0.1:25", "accepted")
    for telemetry in (a, b):
        assert await telemetry.rollup.flush()

    stats = await window_stats(two_writers[1].stats, window=3600, now=clock.now)
    figures = stats.as_dict()
    assert figures["step"] == 60.0
    assert len(figures["series"]) == 60
    assert figures["until"] == (int(clock.now // 60) + 1) * 60
    assert figures["since"] == figures["until"] - 3600
    busy = [s for s in figures["series"] if any(s[k] for k in ("received", "sent", "failed"))]
    assert [s["start"] for s in busy] == [int(NOW // 60) * 60.0, int(clock.now // 60) * 60.0]
    first, second = busy
    assert (first["received"], first["sent"], first["failed"], first["deferred"]) == (4, 3, 2, 1)
    assert second["received"] == 1
    assert figures["upstreams"]["outbox"] == {
        "attempts": 3,
        "successes": 3,
        "failures": 0,
        "success_rate": 1.0,
        "latency_p50": pytest.approx(0.1, rel=0.091),
        "latency_p95": pytest.approx(0.2, rel=0.091),
    }
    ses = figures["upstreams"]["ses"]
    assert (ses["attempts"], ses["successes"], ses["failures"], ses["success_rate"]) == (
        2,
        1,
        1,
        0.5,
    )
    # Outbound queue times 1, 2, 4, 60, 120 s: median 4 s, p95 and max 120 s.
    queue_time = figures["queue_time"]
    assert queue_time["p50"] == pytest.approx(4.0, rel=0.091)
    assert queue_time["p95"] == queue_time["p99"] == queue_time["max"]
    assert queue_time["max"] == pytest.approx(120.0, rel=0.091)
    assert figures["inbound"] == {"received": 2, "delivered": 1, "failed": 0}


async def test_upstream_windows_cover_five_minutes_and_an_hour(
    two_writers: tuple[SQLiteQueue, SQLiteQueue],
) -> None:
    clock = Clock(NOW - 30 * 60)
    a, b = (Telemetry(q.stats, clock=clock, multiprocess_dir="") for q in two_writers)
    a.attempt("ses", "transient", 1.0)  # half an hour ago: in the hour only
    b.attempt("ses", "permanent", 1.0)
    clock.now = NOW
    a.attempt("ses", "accepted", 0.25)
    b.attempt("ses", "accepted", 0.25)
    b.attempt("mailgun", "refused", 0.5)
    for telemetry in (a, b):
        await telemetry.rollup.flush()

    windows = await upstream_windows(two_writers[0].stats, now=NOW)
    assert set(windows) == {"ses", "mailgun"}
    assert windows["ses"]["5m"]["attempts"] == 2
    assert windows["ses"]["5m"]["success_rate"] == 1.0
    assert windows["ses"]["5m"]["latency_p95"] == pytest.approx(0.25, rel=0.091)
    assert windows["ses"]["1h"]["attempts"] == 4
    assert windows["ses"]["1h"]["failures"] == 2
    assert windows["ses"]["1h"]["latency_p95"] == pytest.approx(1.0, rel=0.091)
    assert windows["mailgun"]["5m"]["failures"] == 1
    # Nothing in a window: zeros and no rate, not a missing key.
    later = await upstream_windows(two_writers[0].stats, now=NOW + 20 * 60)
    assert later["ses"]["5m"] == {
        "attempts": 0,
        "successes": 0,
        "failures": 0,
        "success_rate": None,
        "latency_p50": None,
        "latency_p95": None,
    }
    assert later["ses"]["1h"]["attempts"] == 4


@pytest.mark.parametrize(("window", "step"), [(3600, 60), (86400, 1440), (7 * 86400, 10080)])
async def test_each_window_has_about_sixty_whole_minute_intervals(
    two_writers: tuple[SQLiteQueue, SQLiteQueue], window: int, step: int
) -> None:
    stats = await window_stats(two_writers[0].stats, window=window, now=NOW)
    assert stats.step == step
    assert len(stats.series) == 60
    assert stats.until - stats.since == window
    assert all(s["start"] % 60 == 0 for s in stats.series)
    assert stats.queue_time == {"p50": None, "p95": None, "p99": None, "max": None}


class FlakyStore(StatsStore):
    """A store that refuses writes while `down`."""

    def __init__(self) -> None:
        self.cells: dict[tuple[int, str, str, int], float] = {}
        self.down = False

    async def add(self, points: list[StatPoint]) -> None:
        if self.down:
            raise StoreError("database is down")
        for p in points:
            key = (p.minute, p.series, p.label, p.bucket)
            self.cells[key] = self.cells.get(key, 0.0) + p.value

    async def read(
        self, *, since: float, until: float, series: tuple[str, ...] = ()
    ) -> list[StatPoint]:
        return [StatPoint(*key, value) for key, value in self.cells.items()]

    async def purge(self, *, older_than: float) -> int:
        return 0


async def test_counts_survive_a_store_that_is_down_and_the_last_ones_are_written_at_stop() -> None:
    store = FlakyStore()
    telemetry = Telemetry(store, clock=Clock(), multiprocess_dir="")
    telemetry.message_received("l", "accepted")
    store.down = True
    assert not await telemetry.rollup.flush()
    telemetry.message_received("l", "accepted")  # counted while the store is away
    assert not await telemetry.rollup.flush()
    store.down = False
    assert await telemetry.rollup.flush()
    minute = int(NOW // 60)
    assert store.cells == {(minute, series.RECEIVED, "accepted", series.COUNT): 2.0}

    telemetry.start()
    telemetry.message_received("l", "deferred")
    await telemetry.stop()  # no waiting for the next tick
    assert store.cells[(minute, series.RECEIVED, "deferred", series.COUNT)] == 1.0
    assert telemetry.rollup.cells == {}


async def test_inbound_rounds_count_as_notifications_and_finished_work() -> None:
    store = FlakyStore()
    telemetry = Telemetry(store, clock=Clock(), multiprocess_dir="")
    telemetry.inbound("queued")
    telemetry.inbound_round(deferred=True, failed=False, queue_time=1.0)
    telemetry.inbound_round(deferred=False, failed=False, queue_time=30.0)
    telemetry.inbound_round(deferred=False, failed=True, queue_time=90.0)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in telemetry.collect()
        for s in family.samples
    }
    notifications = "relay_inbound_notifications_total"
    for outcome, n in (("queued", 1), ("deferred", 1), ("delivered", 1), ("failed", 1)):
        assert samples[(notifications, (("outcome", outcome),))] == n
    finished = "relay_messages_finished_total"
    assert samples[(finished, (("kind", "inbound"), ("state", "sent")))] == 1
    assert samples[(finished, (("kind", "inbound"), ("state", "failed")))] == 1
    assert samples[("relay_messages_deferred_total", (("kind", "inbound"),))] == 1
    assert samples[("relay_queue_time_seconds_count", (("kind", "inbound"),))] == 2
    await telemetry.rollup.flush()
    stats = await window_stats(store, window=3600, now=NOW)
    assert stats.inbound == {"received": 1, "delivered": 1, "failed": 1}
    assert stats.queue_time["max"] is None  # outbound only: no outbound message finished
