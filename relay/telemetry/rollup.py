"""Per-minute counts kept in memory and added to the shared `StatsStore` every few seconds.

The hot path only adds to a dict; the store is written off it, by one task per process,
in one transaction per flush. Cells whose write failed (database down, disk full) are
kept and added again at the next flush: a cell is a sum, so adding it late is still
right, and nothing counted is lost while the store is away. Cells older than the stats
the relay keeps (`KEEP`) are dropped rather than kept forever during a long outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from relay.queue.base import StatPoint, StatsStore, StoreError

log = logging.getLogger("relay.telemetry")

#: How long the shared stats are kept (the 7-day window, and a day of margin).
KEEP = 8 * 86400.0
FLUSH_INTERVAL = 5.0

Cell = tuple[int, str, str, int]  # minute, series, label, bucket


class Rollup:
    def __init__(
        self,
        store: StatsStore,
        *,
        clock: Callable[[], float] = time.time,
        interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self.cells: dict[Cell, float] = {}
        self._failing = False
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def add(self, series: str, label: str, bucket: int, value: float = 1.0) -> None:
        key = (int(self.clock() // 60), series, label, bucket)
        cells = self.cells
        cells[key] = cells.get(key, 0.0) + value

    # -- writing to the store --------------------------------------------------------------

    async def flush(self) -> bool:
        """Add what was counted since the last flush to the store. False when the store
        could not take it (the cells are kept for the next flush)."""
        async with self._flushing:
            if not self.cells:
                return True
            taken, self.cells = self.cells, {}
            points = [StatPoint(m, s, lab, b, v) for (m, s, lab, b), v in taken.items()]
            try:
                await self.store.add(points)
            except StoreError as exc:
                self._keep(taken)
                if not self._failing:
                    log.warning("stats kept in memory, the store can't take them yet: %s", exc)
                    self._failing = True
                return False
            if self._failing:
                log.info("stats written again now that the store is back")
                self._failing = False
            return True

    def _keep(self, taken: dict[Cell, float]) -> None:
        """Put cells that could not be written back in front of the newer counts."""
        oldest = int((self.clock() - KEEP) // 60)
        cells = self.cells
        for key, value in taken.items():
            if key[0] >= oldest:
                cells[key] = cells.get(key, 0.0) + value

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            await self.flush()

    def start(self) -> None:
        """Flush every `interval` seconds until `stop()`."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="stats-flush")

    async def stop(self) -> None:
        """Stop the flushing task and write what is left (once; kept in memory on failure).

        The task is asked to stop, not cancelled: a write cancelled half way could be
        committed by the store and kept here too, and then counted twice."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
