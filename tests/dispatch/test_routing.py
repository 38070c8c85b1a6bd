"""Routing decisions with an injected clock: breaker states, health, priority, weight and
rate limits, without a network or a sleep."""

from __future__ import annotations

import asyncio
import random

from relay.dispatch.routing import TRIAL_SUCCESSES, BreakerSettings, BreakerState, Router
from relay.message import Envelope
from relay.outcomes import Accepted, PermanentError, TransientError
from relay.upstreams.base import Upstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Dummy(Upstream):
    type_name = "dummy"

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        return Accepted()


def router(clock: Clock, *specs: tuple[str, int, int], max_rate: float = 0.0) -> Router:
    r = Router(
        settings=BreakerSettings(
            failures_to_open=3, cooldown=10.0, cooldown_max=40.0, health_half_life=60.0
        ),
        clock=clock,
        rng=random.Random(7),
    )
    for name, priority, weight in specs:
        r.add(Dummy(name), priority=priority, weight=weight, max_rate=max_rate, max_concurrency=2)
    return r


def breaker(r: Router, name: str) -> BreakerState:
    """Read through a call: the state changes behind mypy's narrowing."""
    return r.state(name).breaker


def names(r: Router, exclude: set[str] | None = None) -> list[str]:
    return [s.name for s in r.candidates(exclude=exclude or set())]


def test_lower_priority_is_used_only_when_the_higher_one_is_unusable() -> None:
    clock = Clock()
    r = router(clock, ("primary", 1, 1), ("backup", 2, 1))
    assert names(r) == ["primary"]
    assert names(r, exclude={"primary"}) == ["backup"]
    r.record_failure(
        r.state("primary"), TransientError("down", upstream_wide=True), 0.1, message_fault=False
    )
    assert r.state("primary").breaker is BreakerState.OPEN
    assert names(r) == ["backup"]


def test_breaker_opens_after_consecutive_failures_half_opens_and_closes() -> None:
    clock = Clock()
    r = router(clock, ("p", 1, 1))
    s = r.state("p")
    for _ in range(2):
        r.record_failure(s, TransientError("503"), 0.1, message_fault=False)
    assert s.breaker is BreakerState.CLOSED
    r.record_failure(s, TransientError("503"), 0.1, message_fault=False)
    assert breaker(r, "p") is BreakerState.OPEN and names(r) == []
    clock.now += 10.0
    assert names(r) == ["p"] and breaker(r, "p") is BreakerState.HALF_OPEN
    # A failed probe reopens it for twice as long.
    r.record_failure(s, TransientError("503"), 0.1, message_fault=False)
    assert breaker(r, "p") is BreakerState.OPEN and s.cooldown == 20.0
    clock.now += 19.0
    assert names(r) == []
    clock.now += 1.0
    assert names(r) == ["p"]
    r.record_success(s, 0.05)
    assert breaker(r, "p") is BreakerState.CLOSED and s.cooldown == 10.0


def test_one_message_that_found_no_upstream_comes_back_for_each_probe() -> None:
    clock = Clock()
    r = router(clock, ("a", 1, 1), ("b", 1, 1), ("c", 2, 1))
    down = TransientError("down", upstream_wide=True)
    assert r.retry_at(1600.0, now=clock.now) == 1600.0  # nothing open: the schedule
    r.record_failure(r.state("a"), down, 0.1, message_fault=False)  # probe at 1010
    clock.now += 4.0
    r.record_failure(r.state("b"), down, 0.1, message_fault=False)  # probe at 1014
    assert r.retry_at(1005.0, now=clock.now) == 1005.0  # the schedule's time is sooner
    r.state("a").paused = True  # an operator's pause: no probe comes of it
    assert r.retry_at(1600.0, now=clock.now) == 1014.0  # this one carries b's probe
    r.state("a").paused = False
    assert r.retry_at(1600.0, now=clock.now) == 1010.0  # and this one a's
    assert r.retry_at(1600.0, now=clock.now) == 1600.0  # the rest wait for their verdicts
    clock.now = 1020.0  # past both probe times, not tried: upstreams it cannot use
    assert r.retry_at(1600.0, now=clock.now) == 1600.0


async def test_a_probe_that_succeeds_is_told_to_whoever_waits_for_recoveries() -> None:
    clock = Clock()
    r = router(clock, ("a", 1, 1), ("b", 1, 1))
    recoveries = r.recoveries()
    r.record_success(r.state("b"), 0.1)  # closed already: nothing came back
    down = TransientError("down", upstream_wide=True)
    r.record_failure(r.state("a"), down, 0.1, message_fault=False)
    clock.now += 10.0
    assert "a" in names(r) and breaker(r, "a") is BreakerState.HALF_OPEN
    r.record_success(r.state("a"), 0.1)  # the probe succeeded
    assert await asyncio.wait_for(anext(recoveries), 1.0) == ["a"]


def test_message_faults_do_not_count_against_the_upstream() -> None:
    clock = Clock()
    r = router(clock, ("p", 1, 1))
    s = r.state("p")
    for _ in range(10):
        r.record_failure(s, PermanentError("550 no such user"), 0.1, message_fault=True)
    assert s.breaker is BreakerState.CLOSED and s.health == 1.0 and s.failures == 0


def test_health_drops_on_failure_and_heals_with_time() -> None:
    clock = Clock()
    r = router(clock, ("p", 1, 1))
    s = r.state("p")
    r.record_failure(s, TransientError("429"), 0.1, message_fault=False)
    assert s.current_health() == 0.5
    clock.now += 60.0  # one half-life
    assert abs(s.current_health() - 0.75) < 1e-9


def test_weights_spread_load_within_a_priority() -> None:
    clock = Clock()
    r = router(clock, ("big", 1, 9), ("small", 1, 1))
    firsts = [names(r)[0] for _ in range(2000)]
    share = firsts.count("big") / len(firsts)
    assert 0.85 < share < 0.95, share


async def test_rate_limit_waits_instead_of_failing() -> None:
    clock = Clock()
    r = router(clock, ("p", 1, 1), max_rate=1.0)
    group = r.candidates(exclude=set())
    async with r.slot(group) as first:
        assert first is not None
    waiter = asyncio.ensure_future(_take(r))
    await asyncio.sleep(0)  # let it find the bucket empty and start waiting
    assert not waiter.done()
    clock.now += 1.0  # a token refills
    assert await asyncio.wait_for(waiter, 5) == "p"
    assert r.state("p").failures == 0


async def _take(r: Router) -> str:
    async with r.slot(r.candidates(exclude=set())) as s:
        assert s is not None
        return s.name


async def test_half_open_lets_one_probe_through_and_others_wait_for_its_verdict() -> None:
    clock = Clock()
    r = router(clock, ("p", 1, 1))
    s = r.state("p")
    r.record_failure(s, TransientError("down", upstream_wide=True), 0.1, message_fault=False)
    clock.now += 10.0
    group = r.candidates(exclude=set())
    async with r.slot(group) as probe:
        assert probe is s and s.probing
        second = asyncio.ensure_future(_take(r))
        await asyncio.sleep(0)
        assert not second.done()  # waits for the probe instead of being deferred
        r.record_success(s, 0.01)
    assert await asyncio.wait_for(second, 5) == "p"


def test_a_peer_that_failed_is_left_alone_while_an_equal_one_is_healthy() -> None:
    """Within a priority the healthiest lead; one that failed recently comes after them
    (failover only) instead of keeping a share by health."""
    clock = Clock()
    r = router(clock, ("steady", 1, 1), ("flaky", 1, 1))
    r.record_failure(r.state("flaky"), TransientError("503"), 0.1, message_fault=False)
    orders = [names(r) for _ in range(200)]
    assert all(order == ["steady", "flaky"] for order in orders)


def _seconds_until_it_leads(r: Router, clock: Clock, name: str) -> int:
    for waited in range(3600):
        if name in _lead(r):
            return waited
        clock.now += 1.0
    raise AssertionError(f"{name} never led again")


def _lead(r: Router) -> set[str]:
    """Who leads: an upstream that comes first at least once in 50 orderings."""
    return {names(r)[0] for _ in range(50)}


def test_each_failed_trial_makes_the_next_return_later_and_a_passed_one_forgets() -> None:
    """A provider failing a share of its mail comes back less and less often (each trial
    it fails halves the margin it must heal to), not every few minutes for ever."""
    clock = Clock()
    r = router(clock, ("steady", 1, 1), ("flaky", 1, 1))
    flaky = r.state("flaky")
    r.record_failure(flaky, TransientError("503"), 0.1, message_fault=False)
    names(r)  # behind its peer: on trial
    first = _seconds_until_it_leads(r, clock, "flaky")
    r.record_failure(flaky, TransientError("503"), 0.1, message_fault=False)  # trial failed
    assert flaky.setbacks == 1
    second = _seconds_until_it_leads(r, clock, "flaky")
    r.record_failure(flaky, TransientError("503"), 0.1, message_fault=False)
    third = _seconds_until_it_leads(r, clock, "flaky")
    assert first < second < third, (first, second, third)
    assert 40 <= second - first <= 80  # one half-life (60 s) more to heal half the gap
    for _ in range(TRIAL_SUCCESSES):
        r.record_success(flaky, 0.05)
    assert not flaky.on_trial and flaky.setbacks == 0


def test_a_peer_back_from_behind_is_on_trial_one_attempt_at_a_time() -> None:
    clock = Clock()
    r = router(clock, ("steady", 1, 1), ("flaky", 1, 1))
    flaky = r.state("flaky")
    r.record_failure(flaky, TransientError("503"), 0.1, message_fault=False)
    names(r)  # ordering it behind its peer puts it on trial
    assert flaky.on_trial and flaky.has_capacity()
    flaky.in_flight = 1
    assert not flaky.has_capacity()  # a second attempt waits for the first one's verdict
    flaky.in_flight = 0
    for _ in range(TRIAL_SUCCESSES - 1):
        r.record_success(flaky, 0.05)
    assert flaky.on_trial
    r.record_success(flaky, 0.05)
    assert not flaky.on_trial  # proved itself: full concurrency again
    flaky.in_flight = 1
    assert flaky.has_capacity()
