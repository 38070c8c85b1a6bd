"""Which upstream gets the next attempt: priority, weight, health, breaker, limits.

Routing knows health, not HTTP: it sees only outcomes (success with a latency, or an
UpstreamError) and turns them into a score and a breaker state per upstream.

- Priority first: a lower number is preferred while any upstream of it is usable.
- Within a priority, weighted random by `weight * health`, so a flaky peer gets less.
- Health drops by half on each failure and heals towards 1.0 with time and successes.
- Breaker: opens after `failures_to_open` consecutive failures, or at once on an
  upstream-wide error (bad credentials, suspended account). While open nothing is sent;
  after a cool-down it lets one probe through (half-open); success closes it, failure
  reopens it with a doubled cool-down.
- Rate (`max_rate`) and concurrency (`max_concurrency`) limits are waited for, never
  counted as failures, and never spill load to a lower priority: a backup provider is
  for outages, not for overflow. Peers of the same priority do share overflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

from relay.upstreams.base import Upstream, UpstreamError

LATENCY_ALPHA = 0.2  # EWMA weight of the newest latency sample


@dataclass(frozen=True)
class BreakerSettings:
    failures_to_open: int = 5
    cooldown: float = 10.0
    cooldown_max: float = 300.0
    health_half_life: float = 60.0  # seconds for the missing health to halve by itself


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass
class RateLimiter:
    """A token bucket; rate 0 means unlimited. Burst is one second's worth."""

    rate: float
    clock: Callable[[], float]
    tokens: float = 0.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = max(self.rate, 1.0)
        self.stamp = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self) -> float:
        if self.rate <= 0:
            return 0.0
        self._refill()
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self) -> None:
        if self.rate > 0:
            self._refill()
            self.tokens -= 1.0


@dataclass
class UpstreamState:
    upstream: Upstream
    priority: int
    weight: int
    max_concurrency: int
    limiter: RateLimiter
    clock: Callable[[], float]
    settings: BreakerSettings
    health: float = 1.0
    health_stamp: float = 0.0
    breaker: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    cooldown: float = 0.0
    probing: bool = False
    in_flight: int = 0
    latency_ewma: float | None = None
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    ambiguous: int = 0
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.upstream.name

    def __post_init__(self) -> None:
        self.cooldown = self.settings.cooldown

    def current_health(self) -> float:
        now = self.clock()
        elapsed = max(0.0, now - self.health_stamp)
        half_life = self.settings.health_half_life
        missing = (1.0 - self.health) * math.pow(0.5, elapsed / half_life)
        self.health, self.health_stamp = 1.0 - missing, now
        return self.health

    def usable(self) -> bool:
        """May attempts go here (breaker closed or half-open)? Open until the cool-down
        has passed; then half-open, where one probe at a time is let through."""
        if self.breaker is BreakerState.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self.breaker = BreakerState.HALF_OPEN
        return True

    def has_capacity(self) -> bool:
        if self.breaker is BreakerState.HALF_OPEN and self.probing:
            return False  # wait for the probe's verdict
        return self.in_flight < self.max_concurrency and self.limiter.wait_time() == 0.0

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.upstream.type_name,
            "priority": self.priority,
            "weight": self.weight,
            "health": round(self.current_health(), 3),
            "breaker": self.breaker.value,
            "in_flight": self.in_flight,
            "latency_ms": None if self.latency_ewma is None else round(self.latency_ewma * 1000, 1),
            "attempts": self.attempts,
            "successes": self.successes,
            "failures": self.failures,
            "ambiguous": self.ambiguous,
            "last_error": self.last_error,
        }


class Router:
    def __init__(
        self,
        *,
        settings: BreakerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or BreakerSettings()
        self.clock = clock
        self.rng = rng or random.Random()
        self.states: list[UpstreamState] = []
        # Set whenever capacity is given back or a probe ends: waiters re-check.
        self._freed = asyncio.Event()

    def add(
        self,
        upstream: Upstream,
        *,
        priority: int,
        weight: int,
        max_rate: float,
        max_concurrency: int,
    ) -> None:
        self.states.append(
            UpstreamState(
                upstream=upstream,
                priority=priority,
                weight=max(weight, 0),
                max_concurrency=max(max_concurrency, 1),
                limiter=RateLimiter(max_rate, self.clock),
                clock=self.clock,
                settings=self.settings,
                health_stamp=self.clock(),
            )
        )

    def state(self, name: str) -> UpstreamState:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    def candidates(
        self, *, exclude: set[str], accept: Callable[[Upstream], bool] | None = None
    ) -> list[UpstreamState]:
        """Usable upstreams of the best priority that has any, in weighted-random order.

        `accept` filters out upstreams that cannot take this particular message; the next
        priority is then considered, as if they were down.
        """
        eligible = [
            s
            for s in self.states
            if s.name not in exclude and s.weight > 0 and (accept is None or accept(s.upstream))
        ]
        for priority in sorted({s.priority for s in eligible}):
            group = [s for s in eligible if s.priority == priority and s.usable()]
            if group:
                return self._weighted_order(group)
        return []

    def _weighted_order(self, group: list[UpstreamState]) -> list[UpstreamState]:
        ordered: list[UpstreamState] = []
        pool = list(group)
        while pool:
            weights = [s.weight * max(s.current_health(), 0.01) for s in pool]
            pick = self.rng.choices(range(len(pool)), weights=weights)[0]
            ordered.append(pool.pop(pick))
        return ordered

    @asynccontextmanager
    async def slot(self, group: list[UpstreamState]) -> AsyncIterator[UpstreamState | None]:
        """Take capacity on the first upstream of `group` that has it, waiting if none has.

        Waits for a rate-limit token, a concurrency slot, or a half-open probe's verdict;
        yields None when every upstream of the group became unusable meanwhile (the probe
        failed), so the caller looks for other candidates. Record the attempt's outcome
        inside the block: the slot, and a probe, are only given back after it.
        """
        while True:
            usable = [s for s in group if s.usable()]
            if not usable:
                yield None
                return
            chosen = next((s for s in usable if s.has_capacity()), None)
            if chosen is not None:
                break
            self._freed.clear()
            waits = [
                s.limiter.wait_time()
                for s in usable
                if s.in_flight < s.max_concurrency and not s.probing
            ]
            timeout = max(min(waits), 0.001) if waits else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), timeout)
        chosen.limiter.take()
        chosen.in_flight += 1
        chosen.attempts += 1
        if chosen.breaker is BreakerState.HALF_OPEN:
            chosen.probing = True
        try:
            yield chosen
        finally:
            chosen.in_flight -= 1
            chosen.probing = False
            self._freed.set()

    def record_success(self, s: UpstreamState, latency: float) -> None:
        s.successes += 1
        s.consecutive_failures = 0
        s.health = min(1.0, s.current_health() + 0.1)
        s.breaker = BreakerState.CLOSED
        s.cooldown = self.settings.cooldown
        self._latency(s, latency)

    def record_failure(
        self, s: UpstreamState, error: UpstreamError, latency: float, *, message_fault: bool
    ) -> None:
        """`message_fault`: the message was refused on its merits; the upstream is fine."""
        self._latency(s, latency)
        s.last_error = error.reason
        if error.ambiguous:
            s.ambiguous += 1
        if message_fault:
            s.consecutive_failures = 0
            return
        s.failures += 1
        s.consecutive_failures += 1
        s.health = s.current_health() * 0.5
        if (
            error.upstream_wide
            or s.breaker is BreakerState.HALF_OPEN
            or s.consecutive_failures >= self.settings.failures_to_open
        ):
            if s.breaker is not BreakerState.CLOSED:
                s.cooldown = min(s.cooldown * 2, self.settings.cooldown_max)
            s.breaker = BreakerState.OPEN
            s.opened_at = self.clock()

    @staticmethod
    def _latency(s: UpstreamState, latency: float) -> None:
        s.latency_ewma = (
            latency
            if s.latency_ewma is None
            else (LATENCY_ALPHA * latency + (1 - LATENCY_ALPHA) * s.latency_ewma)
        )
