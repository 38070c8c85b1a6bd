"""The routing benchmark's own machinery: its clock, its baseline, and that a run drives
the relay's real Router the way delivery does (nothing lost, never back to an upstream
that failed the round)."""

from __future__ import annotations

import asyncio
import random
import time

from bench.routing import (
    START,
    Outage,
    SeedScore,
    Setup,
    SimulatedUpstream,
    Tally,
    run_one,
    run_virtual,
)
from relay.outcomes import TransientError


def test_the_virtual_clock_jumps_instead_of_sleeping() -> None:
    async def ten_minutes_of_timers() -> list[float]:
        loop = asyncio.get_running_loop()
        seen: list[float] = []

        async def sleeper(delay: float) -> None:
            await asyncio.sleep(delay)
            seen.append(loop.time() - START)

        await asyncio.gather(sleeper(600), sleeper(0.5), sleeper(30))
        return seen

    began = time.monotonic()
    seen = run_virtual(ten_minutes_of_timers())
    assert time.monotonic() - began < 5
    assert seen == [0.5, 30, 600]


def test_seed_score_rule_degrades_by_tenths_and_recovers_linearly_over_five_minutes() -> None:
    now = [0.0]
    outage = Outage("x", "", frozenset(), 0.0, 0.0)
    ups = [SimulatedUpstream(i, outage, random.Random(1), Tally(), 0.0) for i in range(3)]
    rule = SeedScore(ups, random.Random(1), lambda: now[0])
    a = rule.states[0]
    rule.record_failure(a, TransientError("503"), 1.0, message_fault=False)
    assert rule.score(a) == 45.0  # 50 * health 0.9, right after the failure
    now[0] = 150.0
    assert abs(rule.score(a) - 47.5) < 1e-9  # half way back to the base
    now[0] = 300.0
    assert rule.score(a) == 50.0
    now[0] = 10.0
    assert [s.name for s in rule.candidates(exclude=set())][-1] == "a"  # worst last


def test_a_relay_run_delivers_everything_and_spares_the_down_upstream() -> None:
    setup = Setup(messages=3000, rate=20.0)
    down = Outage("down", "b down for 60 s", frozenset({1}), 30.0, 60.0)
    relay = run_one("relay", down, setup, seed=1)
    rand = run_one("random", down, setup, seed=1)
    for result in (relay, rand):
        assert result.delivered == setup.messages
        assert result.revisits == 0
        assert result.attempts == result.delivered + result.failures
    # Random choice keeps sending a third of the first attempts to b while it is down.
    assert rand.degraded_share > 0.2
    assert relay.failures < rand.failures / 5
    assert relay.degraded_share < 0.05


def test_all_down_defers_by_the_retry_schedule_and_delivers_later() -> None:
    setup = Setup(messages=600, rate=10.0)
    everything = Outage("all", "all down 20 s", frozenset({0, 1, 2}), 10.0, 20.0)
    result = run_one("score", everything, setup, seed=2)
    assert result.delivered == setup.messages
    assert result.deferrals > 0
    # Deferred at least once means 30 s (the first retry delay) or more before acceptance.
    assert max(result.delays) >= 30.0
