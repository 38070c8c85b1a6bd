"""Routing state for a cluster: one row per upstream (and per rate budget) in PostgreSQL.

Each change runs in a short transaction that locks the rows it merges, so two hosts
reporting at once both count.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from relay.queue.base import (
    SHARE_COLUMNS,
    RoutingStore,
    UpstreamDelta,
    UpstreamShare,
    bucket_take,
    merge_share,
    share_values,
)

T = TypeVar("T")
Run = Callable[[Callable[[asyncpg.Connection], Awaitable[T]]], Awaitable[T]]

_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, 15))
_UPSERT = (
    f"INSERT INTO upstream_state ({SHARE_COLUMNS}) VALUES ({_PLACEHOLDERS})"
    " ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in SHARE_COLUMNS.replace(" ", "").split(",")[1:])
)


class PostgresRouting(RoutingStore):
    def __init__(self, run: Run[object]) -> None:
        # `run(fn)` runs fn(conn) in a transaction, turning connection errors into StoreError.
        self._run = run

    async def sync(
        self, deltas: list[UpstreamDelta], *, now: float, half_life: float
    ) -> dict[str, UpstreamShare]:
        async def run(conn: asyncpg.Connection) -> dict[str, UpstreamShare]:
            if deltas:
                names = sorted(d.name for d in deltas)  # one lock order for every host
                # Rows exist before they are locked: two hosts reporting an upstream for
                # the first time must not both merge into an empty row.
                await conn.executemany(
                    f"INSERT INTO upstream_state ({SHARE_COLUMNS}) VALUES ({_PLACEHOLDERS})"
                    " ON CONFLICT (name) DO NOTHING",
                    [share_values(UpstreamShare(name, health_stamp=now)) for name in names],
                )
                await conn.execute(
                    "SELECT name FROM upstream_state WHERE name = ANY($1::text[])"
                    " ORDER BY name FOR UPDATE",
                    names,
                )
            rows = {
                r["name"]: UpstreamShare(**dict(r))
                for r in await conn.fetch(f"SELECT {SHARE_COLUMNS} FROM upstream_state")
            }
            for delta in deltas:
                row = rows.get(delta.name) or UpstreamShare(delta.name, health_stamp=now)
                rows[delta.name] = merge_share(row, delta, now=now, half_life=half_life)
                await conn.execute(_UPSERT, *share_values(rows[delta.name]))
            return rows

        result = await self._run(run)
        assert isinstance(result, dict)
        return result

    async def take_token(self, name: str, *, rate: float, now: float) -> float:
        async def run(conn: asyncpg.Connection) -> float:
            await conn.execute(
                "INSERT INTO rate_budget (name, tokens, stamp) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO NOTHING",
                name,
                max(rate, 1.0),
                now,
            )
            row = await conn.fetchrow(
                "SELECT tokens, stamp FROM rate_budget WHERE name = $1 FOR UPDATE", name
            )
            tokens, wait = bucket_take(row["tokens"], row["stamp"], rate=rate, now=now)
            await conn.execute(
                "UPDATE rate_budget SET tokens = $2, stamp = $3 WHERE name = $1",
                name,
                tokens,
                max(now, row["stamp"]),
            )
            return wait

        result = await self._run(run)
        assert isinstance(result, float)
        return result
