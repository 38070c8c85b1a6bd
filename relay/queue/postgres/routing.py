"""Routing state for a cluster: one row per upstream (and per rate budget) in PostgreSQL.

Each change runs in a short transaction that locks the rows it merges, so two hosts
reporting at once both count.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from relay.queue.base import (
    IN_FLIGHT_TTL,
    SHARE_COLUMNS,
    InFlightReports,
    RoutingStore,
    UpstreamAction,
    UpstreamDelta,
    UpstreamShare,
    apply_action,
    bucket_take,
    merge_share,
    share_values,
)

T = TypeVar("T")
Run = Callable[[Callable[[asyncpg.Connection], Awaitable[T]]], Awaitable[T]]

_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, len(SHARE_COLUMNS.split(",")) + 1))
_UPSERT = (
    f"INSERT INTO upstream_state ({SHARE_COLUMNS}) VALUES ({_PLACEHOLDERS})"
    " ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in SHARE_COLUMNS.replace(" ", "").split(",")[1:])
)


async def _locked_rows(
    conn: asyncpg.Connection, names: list[str], *, now: float
) -> dict[str, UpstreamShare]:
    """Every upstream's row, those named locked for this transaction (created first, so two
    hosts reporting an upstream for the first time don't both merge into an empty row)."""
    if names:
        ordered = sorted(set(names))  # one lock order for every host
        await conn.executemany(
            f"INSERT INTO upstream_state ({SHARE_COLUMNS}) VALUES ({_PLACEHOLDERS})"
            " ON CONFLICT (name) DO NOTHING",
            [share_values(UpstreamShare(name, health_stamp=now)) for name in ordered],
        )
        await conn.execute(
            "SELECT name FROM upstream_state WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE",
            ordered,
        )
    # Each row with the attempts in progress that live processes reported (IN_FLIGHT_TTL).
    return {
        r["name"]: UpstreamShare(**dict(r))
        for r in await conn.fetch(
            f"SELECT {SHARE_COLUMNS}, COALESCE(f.n, 0)::int AS in_flight FROM upstream_state"
            " LEFT JOIN (SELECT name, sum(count) AS n FROM in_flight WHERE at >= $1"
            " GROUP BY name) f USING (name)",
            now - IN_FLIGHT_TTL,
        )
    }


async def _report_in_flight(
    conn: asyncpg.Connection, owner: str, counts: dict[str, int], *, now: float
) -> None:
    """This process's counts replace its previous report; reports too old to count go."""
    await conn.execute(
        "WITH gone AS (DELETE FROM in_flight WHERE at < $5 AND owner <> $1)"
        " INSERT INTO in_flight (owner, name, count, at)"
        " SELECT $1, * FROM unnest($2::text[], $3::int[]), (SELECT $4::float8) t"
        " ON CONFLICT (owner, name) DO UPDATE SET count = excluded.count, at = excluded.at",
        owner,
        list(counts),
        list(counts.values()),
        now,
        now - IN_FLIGHT_TTL,
    )


class PostgresRouting(RoutingStore):
    def __init__(self, run: Run[object], *, owner: str = "") -> None:
        # `run(fn)` runs fn(conn) in a transaction, turning connection errors into StoreError.
        self._run = run
        self.owner = owner
        self._reports = InFlightReports()

    async def sync(
        self,
        deltas: list[UpstreamDelta],
        *,
        now: float,
        half_life: float,
        in_flight: dict[str, int] | None = None,
    ) -> dict[str, UpstreamShare]:
        report = self._reports.due(in_flight, now=now)

        async def run(conn: asyncpg.Connection) -> dict[str, UpstreamShare]:
            if report:
                await _report_in_flight(conn, self.owner, report, now=now)
            rows = await _locked_rows(conn, [d.name for d in deltas], now=now)
            for delta in deltas:
                row = rows.get(delta.name) or UpstreamShare(delta.name, health_stamp=now)
                rows[delta.name] = merge_share(row, delta, now=now, half_life=half_life)
                await conn.execute(_UPSERT, *share_values(rows[delta.name]))
            return rows

        result = await self._run(run)
        assert isinstance(result, dict)
        self._reports.sent(report, now=now)
        return result

    async def act(
        self, names: list[str], action: UpstreamAction, *, now: float, cooldown: float
    ) -> dict[str, UpstreamShare]:
        async def run(conn: asyncpg.Connection) -> dict[str, UpstreamShare]:
            rows = await _locked_rows(conn, names, now=now)
            for name in names:
                row = rows.get(name) or UpstreamShare(name, cooldown=cooldown, health_stamp=now)
                rows[name] = apply_action(row, action, now=now, cooldown=cooldown)
                await conn.execute(_UPSERT, *share_values(rows[name]))
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
