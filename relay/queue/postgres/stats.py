"""Per-minute stats cells for a cluster: one table every host adds to and reads.

Counts are not promises to a client, so adds commit without waiting for the WAL flush
(the pool's default), like routing state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from relay.queue.base import StatPoint, StatsStore, minute_range

T = TypeVar("T")
Run = Callable[[Callable[[asyncpg.Connection], Awaitable[T]]], Awaitable[T]]


class PostgresStats(StatsStore):
    def __init__(self, run: Run[object]) -> None:
        # `run(fn)` runs fn(conn) in a transaction, turning connection errors into StoreError.
        self._run = run

    async def add(self, points: list[StatPoint]) -> None:
        if not points:
            return
        # One statement for the batch; cells sorted so two hosts adding the same cells lock
        # them in the same order. Duplicates within the batch are summed first (an upsert
        # may touch a row only once per statement).
        cells: dict[tuple[int, str, str, int], float] = {}
        for p in points:
            key = (p.minute, p.series, p.label, p.bucket)
            cells[key] = cells.get(key, 0.0) + p.value
        keys = sorted(cells)

        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO stats (minute, series, label, bucket, value)"
                " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[],"
                " $5::float8[])"
                " ON CONFLICT (minute, series, label, bucket)"
                " DO UPDATE SET value = stats.value + excluded.value",
                [k[0] for k in keys],
                [k[1] for k in keys],
                [k[2] for k in keys],
                [k[3] for k in keys],
                [cells[k] for k in keys],
            )

        await self._run(run)

    async def read(
        self, *, since: float, until: float, series: tuple[str, ...] = ()
    ) -> list[StatPoint]:
        first, end = minute_range(since, until)

        async def run(conn: asyncpg.Connection) -> list[StatPoint]:
            rows = await conn.fetch(
                "SELECT minute, series, label, bucket, value FROM stats"
                " WHERE minute >= $1 AND minute < $2"
                " AND (cardinality($3::text[]) = 0 OR series = ANY($3::text[]))"
                " ORDER BY minute, series, label, bucket",
                first,
                end,
                list(series),
            )
            return [StatPoint(*r) for r in rows]

        result = await self._run(run)
        assert isinstance(result, list)
        return result

    async def purge(self, *, older_than: float) -> int:
        minute, _ = minute_range(older_than, older_than)

        async def run(conn: asyncpg.Connection) -> int:
            status = await conn.execute("DELETE FROM stats WHERE minute < $1", minute)
            return int(status.split()[-1])

        result = await self._run(run)
        assert isinstance(result, int)
        return result
