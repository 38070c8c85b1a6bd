"""The loop that leases due work from the queue and runs it with bounded concurrency.

One scheduler per kind of work (outbound messages, inbound notifications); the worker it
drives decides what an attempt is. It sleeps until the next message is due, or until
`wake()` is called (a new message was queued in this process), and polls the queue every
`poll_interval` for changes made by other processes (the CLI's flush, retry, release).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from relay.message import Kind
from relay.spool import queries
from relay.spool.queries import Claimed
from relay.spool.store import Spool, StoreError

log = logging.getLogger("relay.dispatch")


class Worker(Protocol):
    async def process(self, item: Claimed) -> None:
        """Attempt one leased unit of work and record its outcome in the queue."""


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        worker: Worker,
        *,
        kind: Kind,
        owner: str,
        concurrency: int,
        lease_time: float,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.worker = worker
        self.kind = kind
        self.owner = owner
        self.concurrency = concurrency
        self.lease_time = lease_time
        self.poll_interval = poll_interval
        self.clock = clock
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self.idle = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def _claim(self, limit: int) -> list[Claimed]:
        now = self.clock()
        return await self.spool.write(
            lambda c: queries.claim(
                c,
                kind=self.kind,
                owner=self.owner,
                now=now,
                lease_time=self.lease_time,
                limit=limit,
            )
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
            except StoreError as exc:
                log.error("cannot read the queue: %s; retrying", exc)
                await self._wait(self.poll_interval, self._wake)
                continue
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
            due = await self.spool.read(lambda c: queries.next_due(c, self.kind))
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

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let in-flight attempts finish for `grace` seconds, then cancel.

        A cancelled attempt keeps its lease; recovery at the next start makes it due.
        """
        self._stopping = True
        self._wake.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
