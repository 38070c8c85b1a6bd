"""Shared routing state for the relay processes of one host: `routing.db` beside the shards.

Every worker process reads and writes the same small database, so a breaker opened by one
worker is open for all and `max_rate` is one budget for the host. It holds nothing that
must survive a crash (a lost breaker state heals by itself), so commits skip the fsync.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
from relay.queue.sqlite.hostdb import HostDatabase

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS upstream_state (
    name TEXT PRIMARY KEY, breaker TEXT NOT NULL, opened_at REAL NOT NULL,
    cooldown REAL NOT NULL, changed_at REAL NOT NULL, consecutive_failures INTEGER NOT NULL,
    health REAL NOT NULL, health_stamp REAL NOT NULL, latency_ewma REAL,
    attempts INTEGER NOT NULL, successes INTEGER NOT NULL, failures INTEGER NOT NULL,
    ambiguous INTEGER NOT NULL, last_error TEXT, paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rate_budget (
    name TEXT PRIMARY KEY, tokens REAL NOT NULL, stamp REAL NOT NULL
);
-- Each process's attempts in progress per upstream, summed while recent (IN_FLIGHT_TTL).
CREATE TABLE IF NOT EXISTS in_flight (
    owner TEXT NOT NULL, name TEXT NOT NULL, count INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (owner, name)
) WITHOUT ROWID;
-- Per-minute stats cells (relay.queue.sqlite.stats): every worker adds, any worker reads.
CREATE TABLE IF NOT EXISTS stats (
    minute INTEGER NOT NULL, series TEXT NOT NULL, label TEXT NOT NULL,
    bucket INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (minute, series, label, bucket)
) WITHOUT ROWID;
"""


def _read(conn: sqlite3.Connection) -> dict[str, UpstreamShare]:
    rows = {}
    for r in conn.execute(f"SELECT {SHARE_COLUMNS} FROM upstream_state"):
        row = UpstreamShare(*r)
        row.paused = bool(row.paused)
        rows[row.name] = row
    return rows


def _report_in_flight(
    conn: sqlite3.Connection, owner: str, counts: dict[str, int], *, now: float
) -> None:
    """This process's counts replace its previous report; reports too old to count go."""
    conn.executemany(
        "INSERT OR REPLACE INTO in_flight (owner, name, count, at) VALUES (?, ?, ?, ?)",
        [(owner, name, n, now) for name, n in counts.items()],
    )
    conn.execute("DELETE FROM in_flight WHERE at < ?", (now - IN_FLIGHT_TTL,))


def _add_in_flight(conn: sqlite3.Connection, rows: dict[str, UpstreamShare], *, now: float) -> None:
    for name, n in conn.execute(
        "SELECT name, SUM(count) FROM in_flight WHERE at >= ? GROUP BY name",
        (now - IN_FLIGHT_TTL,),
    ):
        if name in rows:
            rows[name].in_flight = int(n)


def _write(conn: sqlite3.Connection, row: UpstreamShare) -> None:
    values = share_values(row)
    conn.execute(
        f"INSERT OR REPLACE INTO upstream_state ({SHARE_COLUMNS})"
        f" VALUES ({', '.join('?' * len(values))})",
        values,
    )


class SQLiteRouting(RoutingStore):
    def __init__(self, path: Path, *, owner: str = "") -> None:
        self.path = path
        self.owner = owner
        self._reports = InFlightReports()
        # Nothing here must survive a crash: commits skip the fsync.
        self._db = HostDatabase(path, schema=SCHEMA, synchronous="OFF", what="shared routing state")

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(conn) in a transaction on the host's shared database, off the event loop."""
        return await self._db.run(fn)

    def close(self) -> None:
        self._db.close()

    async def sync(
        self,
        deltas: list[UpstreamDelta],
        *,
        now: float,
        half_life: float,
        in_flight: dict[str, int] | None = None,
    ) -> dict[str, UpstreamShare]:
        report = self._reports.due(in_flight, now=now)

        def run(conn: sqlite3.Connection) -> dict[str, UpstreamShare]:
            rows = _read(conn)
            for delta in deltas:
                row = rows.get(delta.name) or UpstreamShare(delta.name, health_stamp=now)
                rows[delta.name] = merge_share(row, delta, now=now, half_life=half_life)
                _write(conn, rows[delta.name])
            if report:
                _report_in_flight(conn, self.owner, report, now=now)
            _add_in_flight(conn, rows, now=now)
            return rows

        rows = await self.run(run)
        self._reports.sent(report, now=now)
        return rows

    async def act(
        self, names: list[str], action: UpstreamAction, *, now: float, cooldown: float
    ) -> dict[str, UpstreamShare]:
        def run(conn: sqlite3.Connection) -> dict[str, UpstreamShare]:
            rows = _read(conn)
            for name in names:
                row = rows.get(name) or UpstreamShare(name, cooldown=cooldown, health_stamp=now)
                rows[name] = apply_action(row, action, now=now, cooldown=cooldown)
                _write(conn, rows[name])
            return rows

        return await self.run(run)

    async def take_token(self, name: str, *, rate: float, now: float) -> float:
        def run(conn: sqlite3.Connection) -> float:
            row = conn.execute(
                "SELECT tokens, stamp FROM rate_budget WHERE name = ?", (name,)
            ).fetchone()
            tokens, stamp = row if row else (max(rate, 1.0), now)
            tokens, wait = bucket_take(tokens, stamp, rate=rate, now=now)
            conn.execute(
                "INSERT OR REPLACE INTO rate_budget (name, tokens, stamp) VALUES (?, ?, ?)",
                (name, tokens, now),
            )
            return wait

        return await self.run(run)
