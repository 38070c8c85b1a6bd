"""Which upstream gets the next attempt: priority, weight, health, breaker, limits.

Routing knows health, not HTTP: it sees only outcomes (success with a latency, or an
UpstreamError) and turns them into a score and a breaker state per upstream.

- Priority first: a lower number is preferred while any upstream of it is usable.
- Within a priority, the healthiest lead (those within LEAD_MARGIN of the best health),
  in weighted-random order by `weight * health`, less for attempts already in flight; the
  others come after them as failover only. A peer that fell behind returns on trial, one
  attempt at a time, until it has succeeded TRIAL_SUCCESSES times in a row; each trial it
  fails halves the margin it must heal to before it leads again (SETBACK_LIMIT).
  (bench/routing.py measures what this saves against other rules.)
- Health drops by half on each failure and heals towards 1.0 with time and successes.
- Breaker: opens after `failures_to_open` consecutive failures, or at once on an
  upstream-wide error (bad credentials, suspended account). While open nothing is sent;
  after a cool-down it lets one probe through (half-open); success closes it, failure
  reopens it with a doubled cool-down.
- Rate (`max_rate`) and concurrency (`max_concurrency`) limits are waited for, never
  counted as failures, and never spill load to a lower priority: a backup provider is
  for outages, not for overflow. Peers of the same priority do share overflow.

Shared state: with a `RoutingStore` (from the queue), decisions are still made from this
process's copy, without a round trip per message, but every process reports what it saw
to the store a few times a second (`sync`, at once after a breaker changes) and adopts
the merged view: the newest breaker transition wins wherever it happened, a run of
failures counts across processes, health and counters are the whole relay's. `max_rate`
is taken from one shared budget per upstream, so 14/s means 14/s for the whole cluster.
`max_concurrency` stays per process. A half-open breaker lets one probe through per
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from relay.outcomes import UpstreamError
from relay.queue.base import (
    LATENCY_ALPHA,
    NO_UPSTREAM,
    RoutingStore,
    StoreError,
    UpstreamDelta,
    UpstreamShare,
    heal,
)
from relay.upstreams.base import Upstream

log = logging.getLogger("relay.dispatch")

# Upstreams within this much health of the best one lead (weighted random among them);
# the rest are tried only after them, healthiest first, as failover.
LEAD_MARGIN = 0.05
# An upstream that fell behind its peers comes back on trial: one attempt at a time until
# this many succeed in a row, so a provider that is still failing costs one failed attempt
# per return instead of a burst of them.
TRIAL_SUCCESSES = 10
# Each trial an upstream fails halves the LEAD_MARGIN it must heal to before it leads
# again (at the 60 s health half-life, a minute more each time), up to this many halvings:
# a provider failing a share of its mail comes back less and less often, not every
# ~200 s for ever. A passed trial forgets them.
SETBACK_LIMIT = 8
SYNC_INTERVAL = 0.25  # seconds between reports to the shared store while there is news


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
    changed_at: float = 0.0  # wall-clock time of the breaker's last transition
    shared_rate: bool = False  # max_rate is taken from the shared budget
    delta: UpstreamDelta = field(init=False)
    in_flight: int = 0
    latency_ewma: float | None = None
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    ambiguous: int = 0
    last_error: str | None = None
    paused: bool = False  # an operator's pause, shared by every process
    # Fell behind its peers' health: back on trial (see TRIAL_SUCCESSES). Per process.
    on_trial: bool = False
    trial_passed: int = 0
    setbacks: int = 0  # trials failed since the last one passed (see SETBACK_LIMIT)
    # Taken out by a reload (removed, or replaced by a new config of the same name): no
    # new attempts; `idle` is set when the last one in flight has finished.
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.upstream.name

    def __post_init__(self) -> None:
        self.cooldown = self.settings.cooldown
        self.delta = UpstreamDelta(self.name)

    def current_health(self) -> float:
        now = self.clock()
        self.health = heal(
            self.health, self.health_stamp, now=now, half_life=self.settings.health_half_life
        )
        self.health_stamp = now
        return self.health

    def set_health(self, health: float) -> None:
        self.delta.health_change += health - self.health
        self.health = health

    def set_breaker(self, state: BreakerState, cause: str) -> None:
        """A transition made here; reported to the other processes at the next sync."""
        now = self.clock()
        self.breaker = state
        if state is BreakerState.OPEN:
            self.opened_at = now
        self.changed_at = now
        self.delta.breaker = (state.value, self.opened_at, self.cooldown, now)
        _log_transition(self, cause)

    def inherit(self, old: UpstreamState) -> None:
        """A replacement (a reload changed the upstream's settings) keeps the name's
        health, breaker and counters, as the shared store does."""
        for name in INHERITED:
            setattr(self, name, getattr(old, name))

    def probe_now(self) -> None:
        """An open breaker lets its probe through at once: what it judged has changed (a
        reload gave the upstream new settings, a fixed key)."""
        if self.breaker is BreakerState.OPEN:
            self.opened_at = self.clock() - self.cooldown

    def take_delta(self) -> UpstreamDelta:
        delta, self.delta = self.delta, UpstreamDelta(self.name)
        return delta

    def adopt(self, row: UpstreamShare, failures_to_open: int) -> bool:
        """Take the merged view. True when that opened the breaker here."""
        self.attempts, self.successes = row.attempts, row.successes
        self.failures, self.ambiguous = row.failures, row.ambiguous
        self.last_error = row.last_error
        self.latency_ewma = row.latency_ewma
        self.health, self.health_stamp = row.health, row.health_stamp
        if bool(row.paused) != self.paused:
            self.paused = bool(row.paused)
            log.warning("upstream %s %s by an operator", self.name, _paused(self.paused))
        if row.changed_at > self.changed_at:
            before = self.breaker
            self.breaker = BreakerState(row.breaker)
            self.opened_at, self.cooldown, self.changed_at = (
                row.opened_at,
                row.cooldown or self.settings.cooldown,
                row.changed_at,
            )
            if self.breaker is BreakerState.CLOSED:
                self.consecutive_failures = 0
            if self.breaker is not before:
                _log_transition(self, "as another process or an operator decided")
        elif self.breaker is BreakerState.CLOSED and row.consecutive_failures >= failures_to_open:
            self.set_breaker(
                BreakerState.OPEN,
                f"{row.consecutive_failures} consecutive failures across the relay's processes"
                f" (last: {row.last_error})",
            )
            return True
        return False

    def usable(self) -> bool:
        """May attempts go here (breaker closed or half-open)? Open until the cool-down
        has passed; then half-open, where one probe at a time is let through."""
        if self.paused or self.retired:
            return False
        if self.breaker is BreakerState.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self.breaker = BreakerState.HALF_OPEN
            log.info("upstream %s breaker half-open: the next attempt is a probe", self.name)
        return True

    def why_unusable(self) -> str:
        """For a deferral's reason: what keeps this upstream out, and its last real error."""
        if self.paused:
            what = "paused by an operator"
        elif self.breaker is BreakerState.OPEN:
            probe = time.strftime("%H:%M:%S", time.gmtime(self.opened_at + self.cooldown))
            what = f"breaker open until {probe}Z"
        else:
            what = f"breaker {self.breaker.value}"
        return f"{self.name}: {what}" + (
            f" (last error: {self.last_error})" if self.last_error else ""
        )

    def has_capacity(self) -> bool:
        if self.breaker is BreakerState.HALF_OPEN and self.probing:
            return False  # wait for the probe's verdict
        if self.on_trial and self.in_flight >= 1:
            return False  # one attempt at a time until it has proved itself again
        return self.in_flight < self.max_concurrency and (
            self.shared_rate or self.limiter.wait_time() == 0.0
        )

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
            "paused": self.paused,
            "next_probe": self.opened_at + self.cooldown
            if self.breaker is BreakerState.OPEN
            else None,
        }


# What a replaced upstream's state hands to its successor (`UpstreamState.inherit`).
INHERITED = (
    "health",
    "health_stamp",
    "breaker",
    "consecutive_failures",
    "opened_at",
    "cooldown",
    "changed_at",
    "latency_ewma",
    "attempts",
    "successes",
    "failures",
    "ambiguous",
    "last_error",
    "paused",
)


def _paused(paused: bool) -> str:
    return "paused" if paused else "resumed"


def _log_transition(s: UpstreamState, cause: str) -> None:
    if s.breaker is BreakerState.OPEN:
        log.warning("upstream %s breaker open for %.0fs: %s", s.name, s.cooldown, cause)
    else:
        log.info("upstream %s breaker %s: %s", s.name, s.breaker.value, cause)


class Router:
    def __init__(
        self,
        *,
        settings: BreakerSettings | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        store: RoutingStore | None = None,
    ) -> None:
        self.settings = settings or BreakerSettings()
        # Wall-clock time: breaker and health times are compared across hosts.
        self.clock = clock
        self.rng = rng or random.Random()
        self.store = store
        self.states: list[UpstreamState] = []
        # Set whenever capacity is given back or a probe ends: waiters re-check.
        self._freed = asyncio.Event()
        self._news = asyncio.Event()  # a breaker changed here: report it now
        self._store_failing = False
        self._sync_lock = asyncio.Lock()  # one report at a time, in order
        self._syncs_started = 0
        self._carried: set[float] = set()  # probe times a deferred message comes back at
        self._recovered: set[str] = set()  # probes that succeeded since `recoveries` looked
        self._recovery = asyncio.Event()

    def add(
        self,
        upstream: Upstream,
        *,
        priority: int,
        weight: int,
        max_rate: float,
        max_concurrency: int,
    ) -> UpstreamState:
        state = UpstreamState(
            upstream=upstream,
            priority=priority,
            weight=max(weight, 0),
            max_concurrency=max(max_concurrency, 1),
            limiter=RateLimiter(max_rate, self.clock),
            clock=self.clock,
            settings=self.settings,
            health_stamp=self.clock(),
            shared_rate=self.store is not None and max_rate > 0,
        )
        self.states.append(state)
        return state

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

    def retry_at(self, scheduled: float, *, now: float) -> float:
        """When to take up again a message that is waiting for an upstream (every breaker
        it could use open): `scheduled` (the retry schedule's time), except for one message
        per probe in this process, which comes back when the breaker lets its probe
        through, if that is sooner: it carries the probe even when no new mail arrives.
        The others need not wake at every probe of a long outage: the probe's success
        makes them due (`recoveries`)."""
        # A probe time already past belongs to an upstream this message cannot use (one
        # that dropped it, or refused it): any other would have been tried.
        probes = sorted(
            t
            for s in self.states
            if s.breaker is BreakerState.OPEN
            and not s.paused
            and s.weight > 0
            and now < (t := s.opened_at + s.cooldown) < scheduled
        )
        self._carried = {t for t in self._carried if t > now}
        probe = next((t for t in probes if t not in self._carried), None)
        if probe is None:
            return scheduled
        self._carried.add(probe)
        return probe

    async def recoveries(self) -> AsyncIterator[list[str]]:
        """The upstreams whose probe succeeded here, as it happens: the mail deferred while
        no upstream could be tried is due again (one process flushes it: the prober's)."""
        while True:
            await self._recovery.wait()
            self._recovery.clear()
            names, self._recovered = sorted(self._recovered), set()
            yield names

    def why_none(self) -> str:
        """Why no upstream can be tried now, naming each one's state and last real error."""
        if not self.states:
            return "no upstream is configured"
        return f"{NO_UPSTREAM}: " + "; ".join(s.why_unusable() for s in self.states)

    def _weighted_order(self, group: list[UpstreamState]) -> list[UpstreamState]:
        """The healthiest lead, in weighted-random order; the others follow, best first.

        A peer that failed recently is left alone while an equally good one is at hand
        (a random share by health kept sending a 30 %-failing provider a fifth of the
        mail), and comes back once its health has healed to within LEAD_MARGIN of the
        best (halved for each trial it failed since its last passed one): on trial.
        Within the lead, an upstream with more attempts in flight gets less, so a
        provider that has started to answer slowly (or not at all) is spared the mail
        that would pile up on it before the first failure is known.
        """
        health = {s.name: s.current_health() for s in group}
        best = max(health.values())
        lead: list[UpstreamState] = []
        behind: list[UpstreamState] = []
        for s in group:
            margin = LEAD_MARGIN * 0.5 ** min(s.setbacks, SETBACK_LIMIT)
            (lead if health[s.name] >= best - margin else behind).append(s)
        behind.sort(key=lambda s: -health[s.name])
        for s in behind:
            if not s.on_trial:
                s.on_trial, s.trial_passed = True, 0
        return self._weighted(lead) + behind

    def _weighted(self, group: list[UpstreamState]) -> list[UpstreamState]:
        ordered: list[UpstreamState] = []
        pool = list(group)
        while pool:
            # In-flight attempts count against an upstream in proportion to its weight,
            # so shares still follow the weights when all are equally quick.
            weights = [
                s.weight * max(s.current_health(), 0.01) / (1 + s.in_flight / s.weight)
                for s in pool
            ]
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
                # Held while the shared budget is asked, so no one else takes them meanwhile.
                chosen.in_flight += 1
                probe = chosen.breaker is BreakerState.HALF_OPEN
                chosen.probing |= probe
                wait = 1.0
                try:
                    wait = await self._rate_wait(chosen)
                finally:
                    chosen.in_flight -= 1
                    if wait > 0 and probe:
                        chosen.probing = False
                    if chosen.in_flight == 0:
                        chosen.idle.set()
                if wait <= 0 and not chosen.retired:
                    break
                self._freed.set()
                if chosen.retired:
                    continue  # a reload took it out while the budget was asked
                await asyncio.sleep(min(wait, 1.0))  # the budget refills with time
                continue
            self._freed.clear()
            waits = [
                s.limiter.wait_time()
                for s in usable
                if s.in_flight < s.max_concurrency and not s.probing and not s.shared_rate
            ]
            timeout = max(min(waits), 0.001) if waits else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), timeout)
        chosen.in_flight += 1
        chosen.attempts += 1
        chosen.delta.attempts += 1
        if chosen.breaker is BreakerState.HALF_OPEN:
            chosen.probing = True
        try:
            yield chosen
        finally:
            chosen.in_flight -= 1
            chosen.probing = False
            if chosen.in_flight == 0:
                chosen.idle.set()
            self._freed.set()

    # -- reloads ------------------------------------------------------------------------

    def retire(self, state: UpstreamState) -> None:
        """Take `state` out of routing (a reload removed or replaced its upstream): no
        new attempts from now on; those in flight finish on it (see `wait_idle`)."""
        state.retired = True
        self.states = [s for s in self.states if s is not state]
        self._freed.set()  # waiters on its capacity look at the others

    @staticmethod
    async def wait_idle(state: UpstreamState) -> None:
        """Until no attempt is in flight on `state` (then its upstream can be closed)."""
        while state.in_flight > 0:
            state.idle.clear()
            await state.idle.wait()

    def adopt_settings(self, settings: BreakerSettings) -> None:
        """New breaker and health settings (a reload), for every upstream at once."""
        self.settings = settings
        for s in self.states:
            s.settings = settings

    async def _rate_wait(self, s: UpstreamState) -> float:
        """Take a send from the upstream's rate budget: 0.0 when taken, else the wait."""
        if not s.shared_rate or self.store is None:
            s.limiter.take()
            return 0.0
        try:
            return await self.store.take_token(s.name, rate=s.limiter.rate, now=self.clock())
        except StoreError as exc:
            # The shared budget is out of reach: this process keeps to the whole rate on
            # its own until it is back (a cluster may briefly exceed it; nothing is lost).
            self._warn_store(exc)
            wait = s.limiter.wait_time()
            if wait <= 0:
                s.limiter.take()
            return wait

    def record_success(self, s: UpstreamState, latency: float) -> None:
        s.successes += 1
        s.delta.successes += 1
        s.delta.reset_run, s.delta.failure_run = True, 0
        s.consecutive_failures = 0
        if s.on_trial:
            s.trial_passed += 1
            if s.trial_passed >= TRIAL_SUCCESSES:
                s.on_trial, s.trial_passed, s.setbacks = False, 0, 0
        s.set_health(min(1.0, s.current_health() + 0.1))
        if s.breaker is not BreakerState.CLOSED:
            s.cooldown = self.settings.cooldown
            s.set_breaker(BreakerState.CLOSED, "an attempt succeeded")
            self._news.set()
            self._recovered.add(s.name)
            self._recovery.set()
        self._latency(s, latency)

    def record_failure(
        self, s: UpstreamState, error: UpstreamError, latency: float, *, message_fault: bool
    ) -> None:
        """`message_fault`: the message was refused on its merits; the upstream is fine."""
        self._latency(s, latency)
        s.last_error = s.delta.last_error = error.reason
        if error.ambiguous:
            s.ambiguous += 1
            s.delta.ambiguous += 1
        if message_fault:
            s.consecutive_failures = 0
            s.delta.reset_run, s.delta.failure_run = True, 0
            return
        s.failures += 1
        if s.on_trial:
            s.setbacks += 1
        s.trial_passed = 0
        s.delta.failures += 1
        s.delta.failure_run += 1
        s.consecutive_failures += 1
        s.set_health(s.current_health() * 0.5)
        if (
            error.upstream_wide
            or s.breaker is BreakerState.HALF_OPEN
            or s.consecutive_failures >= self.settings.failures_to_open
        ):
            if s.breaker is not BreakerState.CLOSED:
                s.cooldown = min(s.cooldown * 2, self.settings.cooldown_max)
            if error.upstream_wide:
                cause = f"upstream-wide error: {error.reason}"
            elif s.breaker is BreakerState.HALF_OPEN:
                cause = f"the probe failed: {error.reason}"
            else:
                cause = f"{s.consecutive_failures} consecutive failures (last: {error.reason})"
            s.set_breaker(BreakerState.OPEN, cause)
            self._news.set()

    @staticmethod
    def _latency(s: UpstreamState, latency: float) -> None:
        s.delta.latency_sum += latency
        s.delta.latency_count += 1
        s.latency_ewma = (
            latency
            if s.latency_ewma is None
            else (LATENCY_ALPHA * latency + (1 - LATENCY_ALPHA) * s.latency_ewma)
        )

    # -- sharing with the other processes ---------------------------------------------------

    async def sync(self) -> None:
        """Report what this process saw since the last sync; adopt the merged view."""
        if self.store is None:
            return
        async with self._sync_lock:
            self._syncs_started += 1
            await self._sync(self.store)

    async def _sync(self, store: RoutingStore) -> None:
        # A reload may change the list while the store is asked: work on this one.
        states = list(self.states)
        deltas = [s.take_delta() for s in states]
        try:
            rows = await store.sync(
                [d for d in deltas if not d.empty],
                now=self.clock(),
                half_life=self.settings.health_half_life,
                # What this process has in progress: the store sums every process's.
                in_flight={s.name: s.in_flight for s in states},
            )
        except StoreError as exc:
            self._warn_store(exc)
            for s, d in zip(states, deltas, strict=True):
                _fold_back(s, d)
            return
        if self._store_failing:
            log.info("shared routing state reachable again")
            self._store_failing = False
        opened = False
        for s in self.states:
            row = rows.get(s.name)
            if row is not None:
                opened |= s.adopt(row, self.settings.failures_to_open)
        if opened:
            self._news.set()
        self._freed.set()

    async def refresh(self) -> None:
        """A sync that starts after this call, shared with whoever else asks meanwhile:
        before giving up on every upstream, look again (an operator may just have resumed
        one or asked for a probe)."""
        if self.store is None:
            return
        asked = self._syncs_started
        async with self._sync_lock:
            if self._syncs_started > asked:
                return  # one began after we asked, and has finished
            self._syncs_started += 1
            await self._sync(self.store)

    async def sync_forever(self, interval: float = SYNC_INTERVAL) -> None:
        """Run `sync` every `interval`, and at once after a breaker changes here."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), interval)
            self._news.clear()
            try:
                await self.sync()
            except Exception:
                log.exception("sharing routing state failed")

    def _warn_store(self, exc: Exception) -> None:
        if not self._store_failing:
            log.warning("shared routing state unavailable, deciding locally: %s", exc)
            self._store_failing = True


def _fold_back(s: UpstreamState, old: UpstreamDelta) -> None:
    """A report that did not reach the store is merged into the next one."""
    new = s.delta
    new.attempts += old.attempts
    new.successes += old.successes
    new.failures += old.failures
    new.ambiguous += old.ambiguous
    if not new.reset_run:
        new.reset_run = old.reset_run
        new.failure_run += old.failure_run
    new.health_change += old.health_change
    new.latency_sum += old.latency_sum
    new.latency_count += old.latency_count
    new.last_error = new.last_error or old.last_error
    new.breaker = new.breaker or old.breaker
