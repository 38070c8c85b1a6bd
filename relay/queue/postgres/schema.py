"""The PostgreSQL queue's schema, versioned: the relay creates and upgrades it itself.

Each entry of MIGRATIONS takes the schema from the previous version to its own; they run
in one transaction under an advisory lock, so hosts starting together migrate once.
Times are epoch seconds (double precision), as in the SQLite engine, so export and import
carry them over unchanged.
"""

from __future__ import annotations

import asyncpg

from relay.queue.base import StoreError

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE messages (
            id           text PRIMARY KEY,
            kind         text NOT NULL,
            state        text NOT NULL,
            mail_from    text NOT NULL,
            rcpts        jsonb NOT NULL,
            size         bigint NOT NULL,
            created      double precision NOT NULL,
            updated      double precision NOT NULL,
            next_attempt double precision NOT NULL,
            attempts     integer NOT NULL DEFAULT 0,
            lease_owner  text,
            lease_until  double precision,
            last_error   text,
            dedupe       text,
            meta         jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX messages_due ON messages (kind, next_attempt)
            WHERE state IN ('queued', 'deferred');
        -- Only finished messages: the purge looks for them by age. Indexing every state
        -- would add index entries on each of a message's three writes (insert, claim,
        -- round), all on the hot path.
        CREATE INDEX messages_finished ON messages (state, updated)
            WHERE state IN ('sent', 'failed');
        CREATE INDEX messages_leased ON messages (lease_until) WHERE state = 'sending';
        CREATE UNIQUE INDEX messages_dedupe ON messages (dedupe) WHERE dedupe IS NOT NULL;
        CREATE TABLE bodies (
            id   text PRIMARY KEY,
            data bytea NOT NULL
        );
        CREATE TABLE events (
            seq    bigserial PRIMARY KEY,
            msg_id text NOT NULL,
            at     double precision NOT NULL,
            type   text NOT NULL,
            detail text NOT NULL
        );
        CREATE INDEX events_msg ON events (msg_id, seq);
        CREATE TABLE upstream_state (
            name text PRIMARY KEY, breaker text NOT NULL, opened_at double precision NOT NULL,
            cooldown double precision NOT NULL, changed_at double precision NOT NULL,
            consecutive_failures integer NOT NULL, health double precision NOT NULL,
            health_stamp double precision NOT NULL, latency_ewma double precision,
            attempts bigint NOT NULL, successes bigint NOT NULL, failures bigint NOT NULL,
            ambiguous bigint NOT NULL, last_error text, paused boolean NOT NULL DEFAULT false
        );
        CREATE TABLE rate_budget (
            name text PRIMARY KEY, tokens double precision NOT NULL,
            stamp double precision NOT NULL
        );
        """,
    ),
    (
        2,
        """
        -- Per-minute stats cells every host adds to (relay.queue.postgres.stats).
        CREATE TABLE stats (
            minute bigint NOT NULL, series text NOT NULL, label text NOT NULL,
            bucket integer NOT NULL, value double precision NOT NULL,
            PRIMARY KEY (minute, series, label, bucket)
        );
        -- The operator's search scans this narrow table, not messages: one row per message,
        -- written with it and never updated (a message's row is rewritten by its claim and
        -- round; this one is not, so it stays small and its pages stay all-visible).
        -- Filled in for messages already here (lower() is Unicode-aware, as Python's).
        CREATE TABLE message_look (id text PRIMARY KEY, look text NOT NULL);
        INSERT INTO message_look (id, look) SELECT id, lower(mail_from || chr(1) ||
            coalesce((SELECT string_agg(r, chr(2))
            FROM jsonb_array_elements_text(meta->'rcpts_original') r), '') || chr(1) ||
            coalesce(meta->>'subject', '')) FROM messages;
        -- Held messages by id (rare, and never on the delivery path).
        CREATE INDEX messages_held ON messages (id) WHERE state = 'held';
        -- Each process's attempts in progress per upstream, summed while recent.
        CREATE TABLE in_flight (
            owner text NOT NULL, name text NOT NULL, count integer NOT NULL,
            at double precision NOT NULL, PRIMARY KEY (owner, name)
        );
        """,
    ),
    (
        3,
        """
        -- Provider events (relay.events). An upstream's message ids, indexed at hand-over,
        -- so its webhooks find the message (relay.queue.base.provider_keys).
        CREATE TABLE provider_ids (
            key text NOT NULL, msg_id text NOT NULL, PRIMARY KEY (key, msg_id)
        );
        CREATE INDEX provider_ids_msg ON provider_ids (msg_id);
        -- Events recorded on a timeline, by their stable key: a provider's retry adds none.
        CREATE TABLE delivery_keys (key text PRIMARY KEY, msg_id text NOT NULL);
        CREATE INDEX delivery_keys_msg ON delivery_keys (msg_id);
        -- Webhook replay guard (Queue.first_use).
        CREATE TABLE nonces (key text PRIMARY KEY, expires double precision NOT NULL);
        CREATE INDEX nonces_expires ON nonces (expires);
        -- The suppression list; `seq` orders changes for the processes that follow them,
        -- a removal is a row with removed = true and a new seq until it is purged.
        CREATE SEQUENCE suppression_seq;
        CREATE TABLE suppressions (
            address text NOT NULL, scope text NOT NULL, reason text NOT NULL,
            source text NOT NULL, created double precision NOT NULL,
            expires double precision, detail text NOT NULL DEFAULT '',
            removed boolean NOT NULL DEFAULT false,
            seq bigint NOT NULL DEFAULT nextval('suppression_seq'),
            PRIMARY KEY (address, scope)
        );
        CREATE INDEX suppressions_seq ON suppressions (seq);
        -- Events on their way to the applications' webhooks.
        CREATE TABLE webhook_outbox (
            seq bigserial PRIMARY KEY, hook text NOT NULL, key text NOT NULL,
            msg_id text NOT NULL, body bytea NOT NULL, created double precision NOT NULL,
            attempts integer NOT NULL DEFAULT 0, next_attempt double precision NOT NULL,
            state text NOT NULL DEFAULT 'waiting', lease_owner text,
            lease_until double precision, last_error text, UNIQUE (hook, key)
        );
        CREATE INDEX webhook_outbox_msg ON webhook_outbox (hook, msg_id, seq)
            WHERE state = 'waiting';
        CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt)
            WHERE state = 'waiting';
        """,
    ),
]

LATEST = MIGRATIONS[-1][0]
# Any constant will do; it only keeps two hosts from migrating at the same moment.
MIGRATION_LOCK = 0x72656C6179


async def current_version(conn: asyncpg.Connection) -> int | None:
    """The schema's version, or None when the relay's tables were never created."""
    exists = await conn.fetchval("SELECT to_regclass('relay_schema') IS NOT NULL")
    if not exists:
        return None
    version: int | None = await conn.fetchval("SELECT max(version) FROM relay_schema")
    return version


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply what is missing; the versions applied (none when current)."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = on")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS relay_schema"
            " (version integer PRIMARY KEY, applied double precision NOT NULL)"
        )
        version = await current_version(conn) or 0
        for number, sql in MIGRATIONS:
            if number > version:
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO relay_schema (version, applied)"
                    " VALUES ($1, extract(epoch from now()))",
                    number,
                )
                applied.append(number)
    return applied


async def require_current(conn: asyncpg.Connection) -> int:
    """The version, or StoreError saying what to run."""
    version = await current_version(conn)
    if version is None:
        raise StoreError(
            "the queue's tables do not exist in this database: run `relay queue migrate`"
            " or set server.auto_migrate = true"
        )
    if version < LATEST:
        raise StoreError(
            f"the queue's schema is version {version}, this relay needs {LATEST}:"
            " run `relay queue migrate` (or set server.auto_migrate = true)"
        )
    if version > LATEST:
        raise StoreError(
            f"the queue's schema is version {version}, newer than this relay knows ({LATEST}):"
            " upgrade the relay"
        )
    return version
