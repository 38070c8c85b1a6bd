"""Routing quality: how many attempts each way of choosing an upstream wastes under outages.

    python -m bench.routing [--messages 100000] [--rate 50] [--seeds 3] [--pattern NAME]...

A simulated clock, no sleeping: the whole run is ordinary asyncio code on an event loop
whose clock jumps to the next timer instead of waiting for it (`VirtualLoop`), so the
relay's own `Router` (relay/dispatch/routing.py) runs unchanged, with its breakers,
half-open probes, concurrency slots and its sync with a shared store (an in-memory
`RoutingStore` that merges reports with the engines' own rule, `merge_share`).

Three upstreams, one traffic source at a steady rate, and a degradation pattern per run
(`PATTERNS`). Every strategy goes through the same delivery rounds, shaped like
`OutboundWorker.process`: ask for candidates (never an upstream this round already tried),
take a slot, send, record the outcome; a transient failure moves the message to the next
candidate at once; with none left the message is deferred by the relay's retry schedule
(`RetryPolicy` with the default `[retry]`). With the relay's router, a message that found
every breaker open waits as the relay's does: one per probe comes back for it
(`Router.retry_at`), the rest when a probe succeeds (`wake_after_recoveries`). Only the
choice of upstream differs:

- relay:  the real `Router` with the default `[routing]` and `[[upstream]]` settings.
- random: uniform random order over the upstreams not yet tried this round.
- score:  the rule of seed 004 (a score per upstream; base 50; health * 0.9 on a failure,
          * 0.9 + 0.1 on a success; the score moves linearly from 50·health right after
          the last failure back to 50 over 5 minutes; best score first, ties at random).

Figures per strategy and pattern (medians over the seeds): failed attempts per delivered
message, messages delayed beyond 1 min, extra latency (mean time from arrival to
acceptance, less a healthy attempt's mean latency), and the share of attempts made while
an upstream was degraded that went to a degraded one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import selectors
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from relay.config import RetryConfig, RoutingConfig, UpstreamConfig
from relay.dispatch.retry import RetryPolicy
from relay.dispatch.routing import BreakerSettings, Router
from relay.message import Envelope
from relay.outcomes import Accepted, TransientError, UpstreamError
from relay.queue.base import (
    RoutingStore,
    UpstreamAction,
    UpstreamDelta,
    UpstreamShare,
    apply_action,
    merge_share,
)
from relay.upstreams.base import Upstream

START = 1_000_000.0  # the virtual clock's first reading (any positive time will do)
HEALTHY_LATENCY = (0.2, 0.4)  # seconds, uniform: a provider's HTTP API on a good day
DOWN_LATENCY = 1.0  # a down provider's answer (a 503 from its load balancer) takes this long
DELAYED = 60.0  # "delayed" means accepted more than this long after arrival
UPSTREAMS = ("a", "b", "c")
T = TypeVar("T")
STRATEGIES = ("relay", "score", "random")

# -- a clock that jumps ----------------------------------------------------------------------


class _JumpingSelector(selectors.SelectSelector):
    """Never waits for I/O: a wait for `timeout` moves the loop's clock forward instead."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("the simulation stalled: nothing is scheduled and nothing is ready")
        self._advance(timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on simulated time: `asyncio.sleep(600)` returns at once, 600 s later
    by `loop.time()`. Callbacks run in the order of their times, as on a real loop."""

    def __init__(self, start: float = START) -> None:
        self._now = start
        super().__init__(_JumpingSelector(self._advance))

    def _advance(self, seconds: float) -> None:
        self._now += max(seconds, 0.0)

    def time(self) -> float:
        return self._now


def run_virtual(main: Coroutine[Any, Any, T], start: float = START) -> T:
    loop = VirtualLoop(start)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


# -- the shared store, in memory ----------------------------------------------------------------


class MemoryRoutingStore(RoutingStore):
    """What the SQLite and PostgreSQL stores keep, kept in a dict: the same merge rule."""

    def __init__(self) -> None:
        self.rows: dict[str, UpstreamShare] = {}

    def _row(self, name: str) -> UpstreamShare:
        return self.rows.setdefault(name, UpstreamShare(name))

    async def sync(
        self,
        deltas: list[UpstreamDelta],
        *,
        now: float,
        half_life: float,
        in_flight: dict[str, int] | None = None,
    ) -> dict[str, UpstreamShare]:
        for delta in deltas:
            merge_share(self._row(delta.name), delta, now=now, half_life=half_life)
        for name, count in (in_flight or {}).items():
            self._row(name).in_flight = count
        return {name: _copy(row) for name, row in self.rows.items()}

    async def act(
        self, names: list[str], action: UpstreamAction, *, now: float, cooldown: float
    ) -> dict[str, UpstreamShare]:
        for name in names:
            apply_action(self._row(name), action, now=now, cooldown=cooldown)
        return {name: _copy(row) for name, row in self.rows.items()}

    async def take_token(self, name: str, *, rate: float, now: float) -> float:
        return 0.0  # the simulated upstreams have no rate limit


def _copy(row: UpstreamShare) -> UpstreamShare:
    return UpstreamShare(**{k: getattr(row, k) for k in UpstreamShare.__dataclass_fields__})


# -- degradation patterns ---------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """One attempt's fate: how long it takes, and the error it ends in (None: accepted)."""

    latency: float
    error: str | None


class Pattern(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def summary(self) -> str: ...

    def degraded(self, upstream: int, t: float) -> bool:
        """Is this upstream out of sorts at `t` (seconds since the start)?"""

    def attempt(self, upstream: int, t: float, rng: random.Random) -> Behaviour: ...


def _healthy(rng: random.Random) -> Behaviour:
    return Behaviour(rng.uniform(*HEALTHY_LATENCY), None)


_DOWN = Behaviour(DOWN_LATENCY, "503 service unavailable")


@dataclass(frozen=True)
class Outage:
    """`upstreams` are down (every attempt answered 503) from `start` for `length` s;
    with `period`, down for the first `length` seconds of every `period` from `start`."""

    name: str
    summary: str
    upstreams: frozenset[int]
    start: float
    length: float
    period: float | None = None

    def degraded(self, upstream: int, t: float) -> bool:
        if upstream not in self.upstreams or t < self.start:
            return False
        since = t - self.start
        if self.period is not None:
            since %= self.period
        return since < self.length

    def attempt(self, upstream: int, t: float, rng: random.Random) -> Behaviour:
        return _DOWN if self.degraded(upstream, t) else _healthy(rng)


@dataclass(frozen=True)
class Flaky:
    """One upstream fails `share` of its attempts at random, all the time."""

    name: str
    summary: str
    upstream: int
    share: float

    def degraded(self, upstream: int, t: float) -> bool:
        return upstream == self.upstream

    def attempt(self, upstream: int, t: float, rng: random.Random) -> Behaviour:
        behaviour = _healthy(rng)
        if upstream == self.upstream and rng.random() < self.share:
            return Behaviour(behaviour.latency, "500 internal server error")
        return behaviour


@dataclass(frozen=True)
class Slowing:
    """One upstream's latency grows linearly from healthy to `final` s over `span` s;
    attempts that would take longer than the upstream's timeout end in a timeout."""

    name: str
    summary: str
    upstream: int
    final: float
    span: float
    timeout: float

    def degraded(self, upstream: int, t: float) -> bool:
        return upstream == self.upstream and self._extra(t) > 1.0

    def _extra(self, t: float) -> float:
        return max(0.0, min(t / self.span, 1.0)) * self.final

    def attempt(self, upstream: int, t: float, rng: random.Random) -> Behaviour:
        behaviour = _healthy(rng)
        if upstream != self.upstream:
            return behaviour
        latency = behaviour.latency + self._extra(t)
        if latency > self.timeout:
            return Behaviour(self.timeout, f"no answer within {self.timeout:.0f}s")
        return Behaviour(latency, None)


def patterns(duration: float) -> list[Pattern]:
    """The five outage shapes of the issue, placed inside a run of `duration` seconds."""
    timeout = UpstreamConfig(name="x", type="x").timeout
    return [
        Outage("hard-down", "b answers 503 for 10 min", frozenset({1}), duration * 0.15, 600.0),
        Flaky("flaky-30%", "b fails 30 % of attempts at random, all run", 1, 0.3),
        Slowing(
            "slowing",
            f"b's latency grows to {2 * timeout:.0f}s over the run (timeout {timeout:.0f}s)",
            1,
            2 * timeout,
            duration,
            timeout,
        ),
        Outage("flapping", "b down 30 s, up 30 s, all run", frozenset({1}), 0.0, 30.0, 60.0),
        Outage(
            "all-down",
            "a, b and c answer 503 for 5 min",
            frozenset({0, 1, 2}),
            duration * 0.3,
            300.0,
        ),
    ]


# -- upstreams that behave as the pattern says ---------------------------------------------------


@dataclass
class Tally:
    attempts: int = 0
    failures: int = 0
    while_degraded: int = 0  # attempts made while some upstream was degraded
    to_degraded: int = 0  # ... of which went to a degraded one


class SimulatedUpstream(Upstream):
    type_name = "simulated"

    def __init__(
        self, index: int, pattern: Pattern, rng: random.Random, tally: Tally, start: float
    ) -> None:
        super().__init__(UPSTREAMS[index])
        self.index, self.pattern, self.rng, self.tally = index, pattern, rng, tally
        self.epoch = start  # the run's start: patterns are in seconds since then
        self.accepted = 0

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        t = asyncio.get_running_loop().time() - self.epoch
        self.tally.attempts += 1
        if any(self.pattern.degraded(i, t) for i in range(len(UPSTREAMS))):
            self.tally.while_degraded += 1
            self.tally.to_degraded += self.pattern.degraded(self.index, t)
        behaviour = self.pattern.attempt(self.index, t, self.rng)
        await asyncio.sleep(behaviour.latency)
        if behaviour.error is not None:
            self.tally.failures += 1
            raise TransientError(behaviour.error)
        self.accepted += 1
        return Accepted(provider_id=f"{self.name}-{self.accepted}")


# -- the strategies, behind the router's own calls ---------------------------------------------


class Choice(Protocol):
    upstream: Upstream


class Chooser(Protocol):
    """The part of `Router` that `OutboundWorker.process` calls."""

    def candidates(self, *, exclude: set[str]) -> list[Any]: ...

    def slot(self, group: list[Any]) -> Any: ...

    def record_success(self, s: Any, latency: float) -> None: ...

    def record_failure(
        self, s: Any, error: UpstreamError, latency: float, *, message_fault: bool
    ) -> None: ...

    async def refresh(self) -> None: ...


@dataclass
class Plain:
    """An upstream as the baselines see it."""

    upstream: Upstream
    health: float = 1.0
    last_error: float = -math.inf

    @property
    def name(self) -> str:
        return self.upstream.name


class _Baseline:
    def __init__(self, upstreams: Iterable[Upstream], rng: random.Random) -> None:
        self.states = [Plain(u) for u in upstreams]
        self.rng = rng

    @asynccontextmanager
    async def slot(self, group: list[Plain]) -> AsyncIterator[Plain]:
        yield group[0]  # no limits, no breakers: the first choice is always taken

    def record_success(self, s: Plain, latency: float) -> None:
        pass

    def record_failure(
        self, s: Plain, error: UpstreamError, latency: float, *, message_fault: bool
    ) -> None:
        pass

    async def refresh(self) -> None:
        pass


class RandomChoice(_Baseline):
    def candidates(self, *, exclude: set[str]) -> list[Plain]:
        group = [s for s in self.states if s.name not in exclude]
        self.rng.shuffle(group)
        return group


class SeedScore(_Baseline):
    """Seed 004's rule, as its README and source describe it."""

    BASE = 50.0
    RECOVERY = 300.0  # seconds for the score to return linearly to the base

    def __init__(
        self, upstreams: Iterable[Upstream], rng: random.Random, clock: Callable[[], float]
    ) -> None:
        super().__init__(upstreams, rng)
        self.clock = clock

    def score(self, s: Plain) -> float:
        weight = min(1.0, (self.clock() - s.last_error) / self.RECOVERY)
        return self.BASE * (weight + s.health * (1.0 - weight))

    def candidates(self, *, exclude: set[str]) -> list[Plain]:
        group = [s for s in self.states if s.name not in exclude]
        self.rng.shuffle(group)  # ties at random: the sort below is stable
        group.sort(key=self.score, reverse=True)
        return group

    def record_success(self, s: Plain, latency: float) -> None:
        s.health = s.health * 0.9 + 0.1

    def record_failure(
        self, s: Plain, error: UpstreamError, latency: float, *, message_fault: bool
    ) -> None:
        s.health *= 0.9
        s.last_error = self.clock()


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Result:
    strategy: str
    pattern: str
    seed: int
    delivered: int = 0
    attempts: int = 0
    failures: int = 0
    delayed: int = 0  # accepted more than DELAYED after arrival
    delay_sum: float = 0.0
    delays: list[float] = field(default_factory=list, repr=False)
    while_degraded: int = 0
    to_degraded: int = 0
    deferrals: int = 0
    revisits: int = 0  # attempts on an upstream that had already failed this round: must be 0

    @property
    def failed_per_delivered(self) -> float:
        return self.failures / max(self.delivered, 1)

    @property
    def extra_latency(self) -> float:
        return self.delay_sum / max(self.delivered, 1) - statistics.fmean(HEALTHY_LATENCY)

    @property
    def degraded_share(self) -> float:
        return self.to_degraded / self.while_degraded if self.while_degraded else 0.0

    @property
    def p99_delay(self) -> float:
        ordered = sorted(self.delays)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


@dataclass(frozen=True)
class Setup:
    messages: int
    rate: float  # arrivals per second

    @property
    def duration(self) -> float:
        return self.messages / self.rate


async def simulate(strategy: str, pattern: Pattern, setup: Setup, seed: int) -> Result:
    """Deliver `setup.messages` arriving at a steady rate; return what it cost."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tally = Tally()
    fates = random.Random(f"{seed}:{pattern.name}:fates")
    upstreams = [SimulatedUpstream(i, pattern, fates, tally, start) for i in range(len(UPSTREAMS))]
    chooser_rng = random.Random(f"{seed}:{pattern.name}:{strategy}")
    tasks: list[asyncio.Task[None]] = []
    router = chooser(strategy, upstreams, chooser_rng, loop.time)
    if isinstance(router, Router):
        await router.sync()  # as `Relay.start` does before dispatching
        tasks.append(loop.create_task(router.sync_forever()))

    retry = RetryConfig()
    policy = RetryPolicy(schedule=tuple(retry.schedule), max_age=retry.max_age)
    result = Result(strategy, pattern.name, seed)
    envelope = Envelope(mail_from="sender@example.com", rcpt_tos=("rcpt@example.net",))
    done = asyncio.Event()
    running: set[asyncio.Task[None]] = set()
    # Deferred without an attempt (every breaker open), by arrival: what a probe's success
    # makes due, as `wake_after_recoveries` does with `Queue.flush(waiting_for_upstream)`.
    waiting: dict[float, tuple[asyncio.TimerHandle, int]] = {}

    # The woken are claimed as the relay's scheduler claims: `retry.concurrency` at a time
    # (all at once, thousands of rounds would wait in `Router.slot` together).
    claims = asyncio.Semaphore(retry.concurrency)

    async def deliver_claimed(arrived: float, rounds: int) -> None:
        async with claims:
            await deliver(arrived, rounds)

    async def wake_after_recoveries(router: Router) -> None:
        async for _ in router.recoveries():
            for arrived, (timer, rounds) in list(waiting.items()):
                timer.cancel()
                spawn(arrived, rounds, deliver_claimed)

    async def deliver(arrived: float, rounds: int) -> None:
        """One round, as `OutboundWorker.process` runs it; then accepted or deferred."""
        tried: set[str] = set()
        failed_here: set[str] = set()
        looked_again = False
        for_upstream = True  # every attempt failed upstream-wide, or none was made
        while True:
            group = router.candidates(exclude=tried)
            if not group and not tried and not looked_again:
                looked_again = True
                await router.refresh()
                continue
            if not group:
                break
            async with router.slot(group) as state:
                if state is None:
                    continue
                upstream = state.upstream
                result.revisits += upstream.name in failed_here
                tried.add(upstream.name)
                began = loop.time()
                outcome: Accepted | UpstreamError
                try:
                    outcome = await upstream.send(envelope, b"")
                except UpstreamError as exc:
                    outcome = exc
                latency = loop.time() - began
                for_upstream &= isinstance(outcome, UpstreamError) and outcome.upstream_wide
                if isinstance(outcome, Accepted):
                    router.record_success(state, latency)
                else:
                    router.record_failure(state, outcome, latency, message_fault=False)
            if isinstance(outcome, Accepted):
                delay = loop.time() - arrived
                result.delivered += 1
                result.delay_sum += delay
                result.delays.append(delay)
                result.delayed += delay > DELAYED
                if result.delivered == setup.messages:
                    done.set()
                return
            failed_here.add(upstream.name)
        result.deferrals += 1
        now = loop.time()
        at = policy.next_attempt(now=now, created=arrived, deferrals=rounds)
        if at is None:
            raise RuntimeError("a message outlived retry.max_age: the run is too long")
        if not for_upstream or not isinstance(router, Router):
            loop.call_at(at, spawn, arrived, rounds + 1)
        else:  # waiting for an upstream: as `OutboundWorker._finish` does
            timer = loop.call_at(router.retry_at(at, now=now), spawn, arrived, rounds + 1)
            waiting[arrived] = (timer, rounds + 1)

    def spawn(
        arrived: float,
        rounds: int,
        how: Callable[[float, int], Coroutine[Any, Any, None]] = deliver,
    ) -> None:
        waiting.pop(arrived, None)
        task = loop.create_task(how(arrived, rounds))
        running.add(task)
        task.add_done_callback(running.discard)

    if isinstance(router, Router):
        tasks.append(loop.create_task(wake_after_recoveries(router)))
    for i in range(setup.messages):
        at = start + i / setup.rate
        loop.call_at(at, spawn, at, 0)
    await done.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    result.attempts, result.failures = tally.attempts, tally.failures
    result.while_degraded, result.to_degraded = tally.while_degraded, tally.to_degraded
    return result


def chooser(
    strategy: str, upstreams: Sequence[Upstream], rng: random.Random, clock: Callable[[], float]
) -> Chooser:
    if strategy == "relay":
        return relay_router(upstreams, rng, clock)
    if strategy == "score":
        return SeedScore(upstreams, rng, clock)
    if strategy == "random":
        return RandomChoice(upstreams, rng)
    raise ValueError(f"unknown strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")


def relay_router(
    upstreams: Sequence[Upstream], rng: random.Random, clock: Callable[[], float]
) -> Router:
    """The relay's router as `relay serve` builds it with the default configuration."""
    r = RoutingConfig()
    router = Router(
        settings=BreakerSettings(
            failures_to_open=r.failures_to_open,
            cooldown=r.cooldown,
            cooldown_max=r.cooldown_max,
            health_half_life=r.health_half_life,
        ),
        clock=clock,
        rng=rng,
        store=MemoryRoutingStore(),
    )
    for upstream in upstreams:
        cfg = UpstreamConfig(name=upstream.name, type="simulated")
        router.add(
            upstream,
            priority=cfg.priority,
            weight=cfg.weight,
            max_rate=cfg.max_rate,
            max_concurrency=cfg.max_concurrency,
        )
    return router


def run_one(strategy: str, pattern: Pattern, setup: Setup, seed: int) -> Result:
    return run_virtual(simulate(strategy, pattern, setup, seed))


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    strategy: str
    pattern: str
    failures: float
    failed_per_delivered: float
    delayed: float
    extra_latency: float
    p99_delay: float
    degraded_share: float
    revisits: int


def median_row(results: list[Result]) -> Row:
    def med(values: Iterable[float]) -> float:
        return statistics.median(values)

    return Row(
        strategy=results[0].strategy,
        pattern=results[0].pattern,
        failures=med(r.failures for r in results),
        failed_per_delivered=med(r.failed_per_delivered for r in results),
        delayed=med(r.delayed for r in results),
        extra_latency=med(r.extra_latency for r in results),
        p99_delay=med(r.p99_delay for r in results),
        degraded_share=med(r.degraded_share for r in results),
        revisits=sum(r.revisits for r in results),
    )


def verdict(rows: dict[tuple[str, str], Row], pattern: str) -> str:
    """The target: the relay makes at most half of seed 004's failed attempts, at no more
    delay (messages delayed beyond 1 min and extra latency, both no higher)."""
    relay, score = rows.get(("relay", pattern)), rows.get(("score", pattern))
    if relay is None or score is None:
        return "n/a"
    ratio = (
        relay.failed_per_delivered / score.failed_per_delivered
        if score.failed_per_delivered
        else math.inf
    )
    fewer = relay.failed_per_delivered <= 0.5 * score.failed_per_delivered
    no_later = relay.delayed <= score.delayed and relay.extra_latency <= score.extra_latency
    ok = "met" if fewer and no_later else "MISSED"
    return f"{ok} (failed ratio {ratio:.2f}{'' if no_later else ', more delay'})"


def table(rows: dict[tuple[str, str], Row], pattern_names: list[str], strategies: list[str]) -> str:
    lines = [
        "| pattern | strategy | failed attempts | failed / delivered | delayed > 1 min |"
        " extra latency (s) | p99 delay (s) | share to degraded |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in pattern_names:
        for strategy in strategies:
            row = rows[(strategy, name)]
            lines.append(
                f"| {name} | {strategy} | {row.failures:.0f} | {row.failed_per_delivered:.4f}"
                f" | {row.delayed:.0f} |"
                f" {row.extra_latency:.3f} | {row.p99_delay:.2f} | {row.degraded_share:.1%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=50.0, help="arrivals per second")
    parser.add_argument("--seeds", type=int, default=3, help="runs per cell; medians reported")
    parser.add_argument(
        "--pattern", action="append", help="only these patterns (repeatable; default all)"
    )
    parser.add_argument(
        "--strategy", action="append", choices=STRATEGIES, help="only these (default all)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("relay").setLevel(logging.ERROR)  # breaker transitions by the thousand

    setup = Setup(messages=args.messages, rate=args.rate)
    chosen = [p for p in patterns(setup.duration) if not args.pattern or p.name in args.pattern]
    if not chosen:
        names = ", ".join(p.name for p in patterns(setup.duration))
        parser.error(f"no pattern matches {args.pattern}: choose from {names}")
    strategies = args.strategy or list(STRATEGIES)
    print(
        f"{setup.messages} messages at {setup.rate:g}/s ({setup.duration / 60:.1f} min),"
        f" upstreams {', '.join(UPSTREAMS)}, seeds 1..{args.seeds}, medians",
        flush=True,
    )
    rows: dict[tuple[str, str], Row] = {}
    for pattern in chosen:
        for strategy in strategies:
            began = time.perf_counter()
            results = [run_one(strategy, pattern, setup, seed) for seed in range(1, args.seeds + 1)]
            rows[(strategy, pattern.name)] = row = median_row(results)
            print(
                f"  {pattern.name:10} {strategy:7} failed {row.failures:.0f}"
                f" failed/delivered {row.failed_per_delivered:.4f}"
                f"  delayed>1min {row.delayed:.0f}  extra {row.extra_latency:.3f}s"
                f"  ({time.perf_counter() - began:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
            if row.revisits:
                raise SystemExit(f"{strategy} went back to an upstream that failed the round")
    print()
    print("\n".join(f"- {p.name}: {p.summary}" for p in chosen))
    print()
    print(table(rows, [p.name for p in chosen], strategies))
    print()
    for pattern in chosen:
        print(f"- {pattern.name}: target {verdict(rows, pattern.name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
