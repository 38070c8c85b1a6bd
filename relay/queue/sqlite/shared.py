"""The host's durable shared state: `shared.db` beside the shards.

Unlike `routing.db` (breakers and counters, which heal if lost, so it skips the fsync),
what lives here must survive a crash: the suppression list, the applications' webhook
outbox, the webhook replay guard. Every worker process of the host reads and writes it,
so the web server in worker 0 and the dispatchers in the others share one list and one
outbox. Commits are few (an event, an operator's change), so `synchronous = FULL` costs
nothing that shows.

Its tables are created when the file is opened (SCHEMA).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay.queue.sqlite.hostdb import HostDatabase

SCHEMA = """
-- Webhook replay guard (Queue.first_use).
CREATE TABLE IF NOT EXISTS nonces (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_expires ON nonces (expires);
-- The suppression list (relay.queue.sqlite.suppression). `seq` orders changes, so each
-- process follows them with `changes(after)`; a removal is a row with removed = 1 and a
-- new seq until it is purged.
CREATE TABLE IF NOT EXISTS suppressions (
    address TEXT NOT NULL, scope TEXT NOT NULL, reason TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, expires REAL, detail TEXT NOT NULL DEFAULT '',
    removed INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL,
    PRIMARY KEY (address, scope)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS suppressions_seq ON suppressions (seq);
-- Events on their way to the applications' webhooks (relay.queue.sqlite.outbox).
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, hook TEXT NOT NULL, key TEXT NOT NULL,
    msg_id TEXT NOT NULL, body BLOB NOT NULL, created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting', lease_owner TEXT, lease_until REAL, last_error TEXT,
    UNIQUE (hook, key)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_msg ON webhook_outbox (hook, msg_id, seq)
    WHERE state = 'waiting';
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_attempt)
    WHERE state = 'waiting';
"""


class SharedDB(HostDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, schema=SCHEMA, synchronous="FULL", what="shared state")


#: Expired nonces forgotten per use: enough to keep up with the arrivals, never a long walk.
NONCE_SWEEP = 100


def forget_use(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("DELETE FROM nonces WHERE key = ?", (key,))


def first_use(conn: sqlite3.Connection, key: str, *, now: float, expires: float) -> bool:
    """Remember `key` until `expires`; False while it is remembered already. A few expired
    keys are forgotten on the way, so the table stays the size of the replay window."""
    conn.execute(
        "DELETE FROM nonces WHERE key IN (SELECT key FROM nonces WHERE expires < ? LIMIT ?)",
        (now, NONCE_SWEEP),
    )
    cur = conn.execute(
        "INSERT INTO nonces (key, expires) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE nonces.expires < ?",
        (key, expires, now),
    )
    return cur.rowcount == 1
