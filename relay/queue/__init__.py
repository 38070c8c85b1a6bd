"""The relay's durable queue: one interface (`base.Queue`), two engines.

- `sqlite` (the default, one host): `server.queue` is a directory. One SQLite database per
  worker process (a shard), WAL with `synchronous = FULL`, one writer thread per shard with
  group commit. Routing state shared by the host's workers lives in `routing.db` beside
  the shards.
- `postgres` (a cluster of relays): `server.queue = "postgresql://..."`. Every host works
  from the same tables: bodies are stored in the database, work is claimed with
  `FOR UPDATE SKIP LOCKED`, `LISTEN/NOTIFY` wakes idle dispatchers, and routing state is
  one row per upstream for the whole cluster.

What every engine guarantees (tests/queue runs one suite against both):
1. `insert` returns only after the message, its body and its `received` event are
   committed durably (fsync / `synchronous_commit = on`); concurrent inserts share
   commits. A failed commit raises StoreError and leaves nothing behind.
2. A claimed unit of work is leased to one owner until `lease_until`; `record_round` writes
   only while that lease holds, so a late result never overwrites recovery or an operator.
3. `recover` makes leases of dead owners due again (expired, or a process on this node
   that is gone) with a `recovered` event: at-least-once, never lost.
4. Every state change writes its timeline event in the same transaction.
5. A `dedupe` key is unique across the whole queue (every shard's writer checks its own
   shard; inbound work always goes to one process's shard on SQLite, to the one table on
   PostgreSQL), so a notification delivered twice is recorded once.
6. Operator actions refuse (QueueActionError, said plainly) what does not apply.

The engines are imported only when configured.
"""

from __future__ import annotations

from relay.config import Config
from relay.queue.base import Queue


def is_postgres(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_queue(config: Config, *, owner: str, shard: int = 0, workers: int = 1) -> Queue:
    """The configured engine for this process (not started yet: call `start()`)."""
    location = config.server.queue
    if is_postgres(location):
        from relay.queue.postgres.engine import PostgresQueue

        queue: Queue = PostgresQueue(
            location,
            owner=owner,
            pool_size=config.server.queue_pool_size,
            auto_migrate=config.server.auto_migrate,
        )
        return queue
    from relay.queue.sqlite.engine import SQLiteQueue

    return SQLiteQueue(
        config.queue_dir,
        owner=owner,
        shard=shard,
        workers=workers,
        min_free_disk=config.server.min_free_disk,
    )
