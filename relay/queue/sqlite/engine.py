"""The SQLite engine: one host, one shard per worker process.

With `server.workers = N`, worker i owns shard i (`queue.db` for 0, `queue-i.db` for the
others): its own writer thread and group commit, so no two processes wait for the same
write lock. Worker 0 also drains shards that no worker owns any more (after `workers` was
lowered). Everything an operator does (search, hold, retry, ...) works on every shard,
through its own short transactions, whether or not a server runs: SQLite's locking keeps
them safe beside the workers' writers. Shard file names are known here and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from relay.message import Claimed, EventType, Kind, NewMessage, Status
from relay.queue.base import (
    DeliveryRecord,
    MessageQuery,
    MessageRow,
    Queue,
    QueueActionError,
    Round,
    RoutingStore,
    StatsStore,
    SuppressionStore,
    WebhookOutbox,
    provider_keys,
)
from relay.queue.sqlite import queries, shared
from relay.queue.sqlite.outbox import SQLiteOutbox
from relay.queue.sqlite.routing import SQLiteRouting
from relay.queue.sqlite.shared import SharedDB
from relay.queue.sqlite.stats import SQLiteStats
from relay.queue.sqlite.store import Spool, connect, shard_of, shard_paths, transaction
from relay.queue.sqlite.suppression import SQLiteSuppressions

T = TypeVar("T")

SHARD_LIST_TTL = 5.0  # seconds a listing of the shard files is used
LOCATED_KEPT = 10_000  # message ids whose shard is remembered
# How long this process's writes to another worker's shard gather before they commit.
EVENT_WRITE_LINGER = 0.01


class SQLiteQueue(Queue):
    def __init__(
        self,
        queue_dir: Path,
        *,
        owner: str,
        shard: int = 0,
        workers: int = 1,
        min_free_disk: int = 0,
    ) -> None:
        super().__init__()
        self.queue_dir = queue_dir
        self.owner = owner
        self.describe = f"sqlite:{queue_dir}"
        self.shard = shard
        self.workers = workers
        # The shard this process writes new work to (also what tests use to inject faults).
        self.spool = Spool(queue_dir, shard=shard, min_free_disk=min_free_disk, segments=True)
        self._spools: dict[int, Spool] = {shard: self.spool}
        self._routing = SQLiteRouting(queue_dir / "routing.db", owner=owner)
        self._stats = SQLiteStats(self._routing)
        # The host's durable shared state: suppression list, webhook outbox, nonces.
        self._shared = SharedDB(queue_dir / "shared.db")
        self._suppressions: SuppressionStore = SQLiteSuppressions(self._shared)
        self._outbox: WebhookOutbox = SQLiteOutbox(self._shared)
        self._direct: dict[Path, tuple[sqlite3.Connection, threading.Lock]] = {}
        self._direct_lock = threading.Lock()
        self._serving = False
        # Group-committing writers for shards this process does not serve: worker 0's web
        # server records the providers' events of every shard's messages, in bursts.
        self._event_writers: dict[Path, Spool] = {}
        # The shard files (listing the directory costs a syscall per file, on the event
        # loop) and which shard holds a message, both looked up again on a miss.
        self._shard_list: tuple[float, list[Path]] | None = None
        self._shard_of: OrderedDict[str, Path] = OrderedDict()

    # -- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Nothing to open ahead: each operator action opens the shard it needs."""

    async def check(self) -> str:
        shards = shard_paths(self.queue_dir)
        if not shards:
            return f"{self.queue_dir} (no queue yet; created at the first start)"
        return f"{self.queue_dir} ({len(shards)} shard(s))"

    async def migrate(self) -> str:
        return f"{self.queue_dir}: SQLite queues create their tables when they open; nothing to do"

    async def start(self) -> None:
        """Open this process's shard (and, for shard 0, the orphaned ones) for serving."""
        if self.shard == 0:
            for path in shard_paths(self.queue_dir):
                n = shard_of(path)
                if n >= self.workers and n not in self._spools:
                    self._spools[n] = Spool(self.queue_dir, shard=n, segments=True)
        for spool in self._spools.values():
            spool.start()
        self._serving = True

    async def close(self) -> None:
        if self._serving:
            for spool in [*self._spools.values(), *self._event_writers.values()]:
                await spool.close()
            self._event_writers.clear()
            self._serving = False
        with self._direct_lock:
            for conn, _lock in self._direct.values():
                conn.close()
            self._direct.clear()
        self._routing.close()
        self._shared.close()

    def check_accepting(self) -> None:
        self.spool.check_free_space()

    async def problems(self) -> list[str]:
        try:
            self.spool.check_free_space()
        except Exception as exc:
            return [str(exc)]
        return []

    # -- the delivery path (this process's shards) ----------------------------------------

    async def insert(self, msg: NewMessage) -> bool:
        inserted = await self.spool.write(lambda c: queries.insert(c, msg))
        if inserted:
            self._work_arrived(msg.kind)
        return inserted

    async def claim(
        self, kind: Kind, *, now: float, lease_time: float, limit: int
    ) -> list[Claimed]:
        claimed: list[Claimed] = []
        for n, spool in self._spools.items():
            want = limit - len(claimed)
            if want <= 0:
                break
            claimed += await spool.write(
                functools.partial(
                    queries.claim,
                    kind=kind,
                    owner=self.owner,
                    now=now,
                    lease_time=lease_time,
                    limit=want,
                    partition=n,
                ),
                durable=False,  # lost only with the machine: the lease is taken again
            )
        return claimed

    async def record_round(self, item: Claimed, *, now: float, rounds: int, rnd: Round) -> bool:
        spool = self._spools[item.partition]
        return await spool.write(
            lambda c: queries.record_round(
                c, item.id, owner=self.owner, now=now, rounds=rounds, rnd=rnd
            ),
            # As PostgreSQL's engine: a round lost with the machine (not with the process)
            # means the message is sent again, the at-least-once the relay promises.
            durable=False,
        )

    async def add_event(
        self, msg_id: str, type_: EventType, at: float, detail: dict[str, Any]
    ) -> None:
        await self._on_message(msg_id, lambda c: queries.add_event(c, msg_id, at, type_, detail))

    async def recover(self, *, now: float, alive: Callable[[str], bool]) -> list[str]:
        recovered: list[str] = []
        for spool in self._spools.values():
            recovered += await spool.write(lambda c: queries.recover(c, now=now, alive=alive))
        return recovered

    async def next_due(self, kind: Kind) -> float | None:
        dues = [await s.read(lambda c: queries.next_due(c, kind)) for s in self._spools.values()]
        known = [d for d in dues if d is not None]
        return min(known) if known else None

    async def purge_history(self, *, state: Status, older_than: float) -> int:
        purged = 0
        for spool in self._spools.values():
            purged += await spool.write(
                lambda c: queries.purge_history(c, state=state, older_than=older_than)
            )
        return purged

    # -- every shard, for the operator -------------------------------------------------

    def _connection(self, path: Path) -> tuple[sqlite3.Connection, threading.Lock]:
        with self._direct_lock:
            if path not in self._direct:
                self._direct[path] = (connect(path), threading.Lock())
            return self._direct[path]

    async def _on_shard(
        self, path: Path, fn: Callable[[sqlite3.Connection], T], *, write: bool = True
    ) -> T:
        def run() -> T:
            conn, lock = self._connection(path)
            with lock:
                return transaction(conn, fn) if write else fn(conn)

        return await asyncio.to_thread(run)

    async def _each_shard(
        self, fn: Callable[[sqlite3.Connection], list[T]], *, write: bool = True
    ) -> list[T]:
        out: list[T] = []
        for path in shard_paths(self.queue_dir):
            out += await self._on_shard(path, fn, write=write)
        return out

    async def _on_message(self, msg_id: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn on the shard that holds the message."""
        for path in shard_paths(self.queue_dir):
            if await self._on_shard(
                path, lambda c: queries.get(c, msg_id) is not None, write=False
            ):
                return await self._on_shard(path, fn)
        raise QueueActionError(f"no message {msg_id} in the queue")

    def _serving_spool(self, path: Path) -> Spool | None:
        if self._serving:
            for spool in self._spools.values():
                if spool.path == path:
                    return spool
        return None

    async def _write_shard(self, path: Path, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn in a write transaction on one shard: group-committed by this process's writer
        when it serves that shard (webhook events come in bursts), else a transaction of its
        own beside the shard's writer."""
        spool = self._serving_spool(path)
        if spool is None and self._serving:
            spool = self._event_writers.get(path)
            if spool is None:
                spool = self._event_writers[path] = Spool(
                    self.queue_dir, shard=shard_of(path), linger=EVENT_WRITE_LINGER
                )
                spool.start()
        if spool is not None:
            return await spool.write(fn)
        return await self._on_shard(path, fn)

    async def _write_message(self, msg_id: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn on the shard that holds the message (fn checks again that it is there)."""
        path = await self._locate(msg_id)
        if path is None:
            raise QueueActionError(f"no message {msg_id} in the queue")
        return await self._write_shard(path, fn)

    def _shards(self, *, fresh: bool = False) -> list[Path]:
        """The shard files, listed again at most every few seconds (or when `fresh`)."""
        now = time.monotonic()
        if fresh or self._shard_list is None or now - self._shard_list[0] > SHARD_LIST_TTL:
            self._shard_list = (now, shard_paths(self.queue_dir))
        return self._shard_list[1]

    async def _locate(self, msg_id: str) -> Path | None:
        """The shard that holds a message: remembered for the recent ones (a provider's
        events for a message come together), else looked for in one trip off the loop."""
        known = self._shard_of.get(msg_id)
        if known is not None:
            return known
        for fresh in (False, True):
            paths = self._shards(fresh=fresh)
            found = await asyncio.to_thread(self._find_shard, paths, msg_id)
            if found is not None:
                self._shard_of[msg_id] = found
                while len(self._shard_of) > LOCATED_KEPT:
                    self._shard_of.popitem(last=False)
                return found
        return None

    def _find_shard(self, paths: list[Path], msg_id: str) -> Path | None:
        for path in paths:
            conn, lock = self._connection(path)
            with lock:
                if queries.exists(conn, msg_id):
                    return path
        return None

    async def get(self, msg_id: str) -> MessageRow | None:
        path = await self._locate(msg_id)
        if path is None:
            return None
        row = await self._on_shard(path, lambda c: queries.get(c, msg_id), write=False)
        if row is None:
            self._shard_of.pop(msg_id, None)  # deleted or purged since
        return row

    async def timeline(self, msg_id: str) -> list[dict[str, Any]]:
        return await self._each_shard(lambda c: queries.timeline(c, msg_id), write=False)

    async def body(self, msg_id: str) -> bytes | None:
        found = await self._each_shard(
            lambda c: [b] if (b := queries.body(c, msg_id)) else [], write=False
        )
        return found[0] if found else None

    async def search(
        self, *, state: str | None = None, kind: str | None = None, limit: int = 1000
    ) -> list[MessageRow]:
        rows = await self._each_shard(
            lambda c: queries.list_messages(c, state=state, kind=kind, limit=limit), write=False
        )
        return sorted(rows, key=lambda r: r.id)[:limit]

    async def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for per_shard in await self._each_shard(lambda c: [queries.counts(c)], write=False):
            for state, n in per_shard.items():
                total[state] = total.get(state, 0) + n
        return total

    async def find(self, query: MessageQuery) -> list[MessageRow]:
        """Each shard's newest matches, merged newest first (ids sort by arrival across
        shards too: the clock is their prefix)."""
        rows = await self._each_shard(lambda c: queries.find(c, query), write=False)
        return sorted(rows, key=lambda r: r.id, reverse=True)[: query.limit]

    async def oldest(self, *, states: tuple[str, ...]) -> float | None:
        found = await self._each_shard(
            lambda c: [t] if (t := queries.oldest(c, states)) is not None else [], write=False
        )
        return min(found) if found else None

    async def dedupe_owner(self, dedupe: str, *, since: float) -> str | None:
        """Read first (the usual answer needs no write lock); a holder too old lets go in
        a write transaction of its shard."""
        owner = None
        for path in shard_paths(self.queue_dir):
            held = await self._on_shard(
                path, lambda c: queries.dedupe_holder(c, dedupe), write=False
            )
            if held is None:
                continue
            msg_id, created = held
            if created >= since:
                owner = owner or msg_id
            else:
                release = functools.partial(
                    queries.release_dedupe, msg_id=msg_id, dedupe=dedupe, before=since
                )
                await self._on_shard(path, release)
        return owner

    async def _made_due(self, msg_id: str) -> None:
        row = await self.get(msg_id)
        if row is not None:
            self._work_arrived(Kind(row.kind))

    async def hold(self, msg_id: str, *, now: float, actor: str) -> None:
        await self._on_message(msg_id, lambda c: queries.hold(c, msg_id, now=now, actor=actor))

    async def release(self, msg_id: str, *, now: float, actor: str) -> None:
        await self._on_message(msg_id, lambda c: queries.release(c, msg_id, now=now, actor=actor))
        await self._made_due(msg_id)

    async def retry(self, msg_id: str, *, now: float, actor: str) -> None:
        await self._on_message(msg_id, lambda c: queries.retry(c, msg_id, now=now, actor=actor))
        await self._made_due(msg_id)

    async def retry_failed(self, *, now: float, actor: str) -> list[str]:
        ids = await self._each_shard(lambda c: queries.retry_failed(c, now=now, actor=actor))
        if ids:
            self._wake_all()
        return ids

    async def delete(self, msg_id: str, *, actor: str) -> None:
        await self._on_message(msg_id, lambda c: queries.delete(c, msg_id, actor=actor))

    async def flush(
        self, *, now: float, actor: str, waiting_for_upstream: bool = False
    ) -> list[str]:
        ids = await self._each_shard(
            lambda c: queries.flush(
                c, now=now, actor=actor, waiting_for_upstream=waiting_for_upstream
            )
        )
        if ids:
            self._wake_all()
        return ids

    # -- provider events ----------------------------------------------------------------

    async def find_by_provider_id(self, provider_id: str) -> str | None:
        keys = provider_keys(provider_id)
        if not keys:
            return None
        found = await self._each_shard(
            lambda c: [m] if (m := queries.find_by_provider_id(c, keys)) else [], write=False
        )
        return max(found) if found else None

    async def record_delivery(self, rec: DeliveryRecord) -> bool:
        return await self._write_message(rec.msg_id, lambda c: queries.record_delivery(c, rec))

    async def requeue(
        self, msg_id: str, rcpts: list[str], *, exclude: str, now: float, reason: str, key: str
    ) -> bool:
        kind = await self._write_message(
            msg_id,
            functools.partial(
                queries.requeue,
                msg_id=msg_id,
                rcpts=rcpts,
                exclude=exclude,
                now=now,
                reason=reason,
                key=key,
            ),
        )
        if kind is None:
            return False
        self._work_arrived(Kind(kind))
        return True

    async def drop_bodies(self, *, sent_before: float) -> int:
        dropped = 0
        for path in shard_paths(self.queue_dir):
            while True:
                n = await self._write_shard(
                    path, functools.partial(queries.drop_bodies, sent_before=sent_before)
                )
                dropped += n
                if n < queries.DROP_BATCH:
                    break
        return dropped

    async def first_use(self, key: str, *, now: float, expires: float) -> bool:
        return await self._shared.run(
            functools.partial(shared.first_use, key=key, now=now, expires=expires)
        )

    async def forget_use(self, key: str) -> None:
        await self._shared.run(functools.partial(shared.forget_use, key=key))

    @property
    def suppressions(self) -> SuppressionStore:
        return self._suppressions

    @property
    def outbox(self) -> WebhookOutbox:
        return self._outbox

    @property
    def routing(self) -> RoutingStore:
        return self._routing

    @property
    def stats(self) -> StatsStore:
        return self._stats

    # -- export / import ------------------------------------------------------------------

    async def export(self) -> AsyncIterator[dict[str, Any]]:
        for path in shard_paths(self.queue_dir):
            after = ""
            while True:
                batch = await self._on_shard(
                    path,
                    functools.partial(queries.export_rows, after=after, limit=200),
                    write=False,
                )
                if not batch:
                    break
                for record in batch:
                    yield record
                after = batch[-1]["id"]

    async def import_record(self, record: dict[str, Any]) -> bool:
        path = self.spool.path
        return await self._on_shard(path, lambda c: queries.import_row(c, record))
