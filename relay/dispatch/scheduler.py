"""The loop that leases due work from the queue and runs it with bounded concurrency.

One scheduler per kind of work (outbound messages, inbound notifications); the worker it
drives decides what an attempt is. It sleeps until the next message is due, or until the
queue says work arrived (`Queue.on_work`: this process's inserts and operator actions, and
on PostgreSQL every host's), and polls every `poll_interval` as a fallback for changes the
engine can't announce (the CLI on SQLite). A queue that can't be read (database down)
pauses it; it resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from relay.message import Claimed, Kind
from relay.queue.base import Queue, Round, StoreError

log = logging.getLogger("relay.dispatch")


RECORD_RETRY_MAX = 5.0  # seconds between tries to record an outcome while the queue is down


async def record_outcome(
    queue: Queue, item: Claimed, *, now: float, rounds: int, rnd: Round
) -> bool:
    """Record a round's outcome, keeping it and trying again while the queue can't write
    (disk full, database restarting) instead of dropping it: otherwise the message would
    wait for its lease to expire, and one already delivered would be sent again.
    False when the lease was lost meanwhile (the work was recovered elsewhere)."""
    delay, failing = 0.25, False
    while True:
        try:
            recorded = await queue.record_round(item, now=now, rounds=rounds, rnd=rnd)
        except StoreError as exc:
            if not failing:
                log.error(
                    "%s: outcome kept in memory, the queue can't record it yet: %s", item.id, exc
                )
                failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX)
            continue
        if failing:
            log.info("%s: outcome recorded now that the queue is back", item.id)
        if not recorded:
            log.warning("%s: lease lost before the outcome was recorded; it was retried", item.id)
        return recorded


class Worker(Protocol):
    async def process(self, item: Claimed) -> None:
        """Attempt one leased unit of work and record its outcome in the queue."""


class Scheduler:
    def __init__(
        self,
        queue: Queue,
        worker: Worker,
        *,
        kind: Kind,
        concurrency: int,
        lease_time: float,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.worker = worker
        self.kind = kind
        self.concurrency = concurrency
        self.lease_time = lease_time
        self.poll_interval = poll_interval
        self.clock = clock
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._hurry = asyncio.Event()  # a stop's grace cut short
        self.idle = asyncio.Event()
        self._store_failing = False
        queue.on_work(self._on_work)

    def wake(self) -> None:
        self._wake.set()

    def _on_work(self, kind: Kind) -> None:
        if kind is self.kind:
            self._wake.set()

    async def _claim(self, limit: int) -> list[Claimed]:
        return await self.queue.claim(
            self.kind, now=self.clock(), lease_time=self.lease_time, limit=limit
        )

    def _spawn(self, item: Claimed) -> None:
        task = asyncio.create_task(self._run_one(item), name=f"{self.kind}-{item.id}")
        self._tasks.add(task)
        self.idle.clear()

    async def _run_one(self, item: Claimed) -> None:
        try:
            await self.worker.process(item)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not kill the loop; the lease expires and the message is retried.
            log.exception("%s %s: unexpected error while processing", self.kind, item.id)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            self._slot_freed.set()
            if not self._tasks:
                self.idle.set()

    async def _wait(self, timeout: float, *events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(
                waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waiters:
                w.cancel()

    async def run(self) -> None:
        """Run until cancelled."""
        while not self._stopping:
            free = self.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wake.clear()
            try:
                items = await self._claim(free)
                due = None if items else await self.queue.next_due(self.kind)
            except StoreError as exc:
                if not self._store_failing:
                    log.error("%s dispatch paused, the queue is unavailable: %s", self.kind, exc)
                    self._store_failing = True
                await self._wait(self.poll_interval, self._wake)
                continue
            if self._store_failing:
                log.info("%s dispatch resumed, the queue is available again", self.kind)
                self._store_failing = False
            if self._stopping:
                return  # claimed as the stop began: Relay.stop releases their leases
            for item in items:
                self._spawn(item)
            if len(items) == free:
                continue
            if items:
                # Everything due was taken. What comes due later is looked up once the
                # queue is drained, not after every claim: a busy relay claims a few
                # messages at a time, hundreds of times a second.
                await self._wait(self.poll_interval, self._wake)
                continue
            delay = (
                self.poll_interval if due is None else min(self.poll_interval, due - self.clock())
            )
            if delay > 0:
                await self._wait(delay, self._wake)

    async def run_until_empty(self) -> None:
        """Process everything due now, and what that produces, then return (for tests)."""
        while True:
            items = await self._claim(self.concurrency)
            for item in items:
                self._spawn(item)
            if not items and not self._tasks:
                return
            if self._tasks:
                await asyncio.wait(set(self._tasks))

    async def stop(self, grace: float = 10.0) -> int:
        """Stop claiming; let in-flight attempts finish for `grace` seconds (or until
        `hurry`), then cancel the rest. Returns how many were cancelled.

        A cancelled attempt keeps its lease until the caller releases it (Relay.stop) or
        recovery makes it due: at the next start on this host, or when it expires.
        """
        self._stopping = True
        self._wake.set()
        if self._tasks:
            await self._wait(grace, self.idle, self._hurry)  # idle: no attempt left
        cancelled = list(self._tasks)
        for task in cancelled:
            task.cancel()
        if cancelled:
            await asyncio.gather(*cancelled, return_exceptions=True)
        return len(cancelled)

    def hurry(self) -> None:
        """End a stop's grace now: attempts still running are cancelled."""
        self._hurry.set()
