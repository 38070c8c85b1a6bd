"""Group commit for the PostgreSQL engine: inserts waiting at the same moment share one
statement and one commit (one WAL flush), as the SQLite writer's batches do."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from relay.message import NewMessage
from relay.queue.base import StoreError
from relay.queue.postgres.statements import insert_batch

log = logging.getLogger("relay.queue")

MAX_BATCH = 512  # a batch this large already amortises the commit
Run = Callable[[Callable[[asyncpg.Connection], Awaitable[list[bool]]]], Awaitable[list[bool]]]


class InsertBatcher:
    """Group commit: inserts waiting at the same moment share one transaction (and one WAL
    flush). Two batches may be in flight at once, so a commit's round trip does not idle
    the next batch."""

    def __init__(self, run: Run, *, lanes: int = 2) -> None:
        # `run(fn)` runs fn(conn) on a pooled connection, raising StoreError when it can't.
        self._run = run
        self._waiting: asyncio.Queue[tuple[NewMessage, asyncio.Future[bool]]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._lane(), name="queue-insert") for _ in range(lanes)]

    async def submit(self, msg: NewMessage) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._waiting.put((msg, future))
        return await future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._waiting.empty():
            _msg, future = self._waiting.get_nowait()
            if not future.done():
                future.set_exception(StoreError("the queue is closing"))

    async def _lane(self) -> None:
        while True:
            batch = [await self._waiting.get()]
            while len(batch) < MAX_BATCH and not self._waiting.empty():
                batch.append(self._waiting.get_nowait())
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[NewMessage, asyncio.Future[bool]]]) -> None:
        msgs = [m for m, _ in batch]
        try:
            results = await self._run(lambda c: insert_batch(c, msgs))
        except Exception as exc:
            if not isinstance(exc, StoreError):
                log.exception("queue insert failed unexpectedly")
                exc = StoreError(f"queue write failed: {type(exc).__name__}: {exc}")
            if len(batch) > 1 and "cannot reach" not in str(exc):
                # One message the database refused (bad data) must not fail the others.
                for item in batch:
                    await self._commit([item])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreError("the queue is closing"))
            raise
        for (_, future), ok in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(ok)
