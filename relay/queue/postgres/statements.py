"""The PostgreSQL engine's statements that several of its methods share: events,
timelines, the operator's retry, the batch insert, export and import, and what provider
events do (their keys, a requeue, kept bodies, the replay guard)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from relay.message import EventType, NewMessage, Status, stored_meta
from relay.queue.base import (
    IMPORT_COLUMNS,
    DeliveryRecord,
    MessageQuery,
    MessageRow,
    QueueActionError,
    QueueBusy,
    event_detail,
    import_values,
    kind_conditions,
    look_filters,
    look_text,
)
from relay.queue.delivery import (
    busy,
    not_kept,
    requeued_meta,
    requeued_rcpts,
    requeued_state,
    status_meta,
)

CHANNEL = "relay_work"  # LISTEN/NOTIFY channel; the payload is the kind of work
COLUMNS = (
    "id, kind, state, mail_from, rcpts, size, created, updated, next_attempt,"
    " attempts, last_error, meta"
)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def row_of(r: asyncpg.Record) -> MessageRow:
    return MessageRow(
        r["id"],
        r["kind"],
        r["state"],
        r["mail_from"],
        json.loads(r["rcpts"]),
        r["size"],
        r["created"],
        r["updated"],
        r["next_attempt"],
        r["attempts"],
        r["last_error"],
        json.loads(r["meta"]),
    )


async def add_events(
    conn: asyncpg.Connection, events: list[tuple[str, EventType, float, dict[str, Any]]]
) -> None:
    if events:
        await conn.execute(
            "INSERT INTO events (msg_id, type, at, detail)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[])",
            [e[0] for e in events],
            [e[1].value for e in events],
            [e[2] for e in events],
            [dumps(e[3]) for e in events],
        )


async def timeline(conn: asyncpg.Connection, msg_id: str) -> list[dict[str, Any]]:
    return [
        {"at": r["at"], "type": r["type"], **json.loads(r["detail"])}
        for r in await conn.fetch(
            "SELECT at, type, detail FROM events WHERE msg_id = $1 ORDER BY seq", msg_id
        )
    ]


async def retry(conn: asyncpg.Connection, row: MessageRow, *, now: float, actor: str) -> None:
    """Make a failed, held or deferred message due now (postsuper -r)."""
    if row.state == Status.SENT:
        raise QueueActionError(f"message {row.id} was already sent; nothing to retry")
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM bodies WHERE id = $1)", row.id):
        raise QueueActionError(f"message {row.id} has no stored body left to send")
    rcpts = row.rcpts
    if row.state == Status.FAILED:
        # Only the recipients that failed: the others already have their copy. A failed
        # message gets a new max_age window (meta.retried_at); its arrival time stays.
        rcpts = list(row.meta.get("rcpts_failed") or {}) or rcpts or row.meta["rcpts_original"]
    await conn.execute(
        "UPDATE messages SET state = 'queued', next_attempt = $2, updated = $2,"
        " rcpts = $3::jsonb, meta = CASE WHEN state = 'failed'"
        " THEN (meta - 'rcpts_failed') || jsonb_build_object('retried_at', $2::float8)"
        " ELSE meta - 'rcpts_failed' END WHERE id = $1",
        row.id,
        now,
        dumps(rcpts),
    )
    await add_events(conn, [(row.id, EventType.RETRY, now, {"by": actor, "from_state": row.state})])
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, row.kind)


async def insert_batch(conn: asyncpg.Connection, msgs: list[NewMessage]) -> list[bool]:
    """Insert many messages, their bodies and `received` events, and announce them, in one
    statement (one round trip, one commit); per message: inserted, or a dedupe duplicate."""
    metas = [stored_meta(m) for m in msgs]
    rows = await conn.fetch(
        "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
        " $5::bigint[], $6::float8[], $7::text[], $8::text[], $9::bytea[], $10::text[],"
        " $12::text[]) AS u(i, k, f, r, s, t, d, m, data, detail, look)),"
        " ins AS (INSERT INTO messages (id, kind, state, mail_from, rcpts, size, created,"
        " updated, next_attempt, dedupe, meta)"
        " SELECT i, k, 'queued', f, r::jsonb, s, t, t, t, d, m::jsonb FROM u"
        " ON CONFLICT DO NOTHING RETURNING id, kind),"
        " l AS (INSERT INTO message_look (id, look)"
        " SELECT u.i, u.look FROM u JOIN ins ON ins.id = u.i),"
        " b AS (INSERT INTO bodies (id, data) SELECT u.i, u.data FROM u JOIN ins ON ins.id = u.i),"
        " e AS (INSERT INTO events (msg_id, type, at, detail)"
        " SELECT u.i, 'received', u.t, u.detail FROM u JOIN ins ON ins.id = u.i ORDER BY u.i),"
        " n AS (SELECT pg_notify($11, kind) FROM (SELECT DISTINCT kind FROM ins) k)"
        " SELECT id FROM ins UNION ALL SELECT NULL FROM n",
        [m.id for m in msgs],
        [m.kind.value for m in msgs],
        [m.envelope.mail_from for m in msgs],
        [dumps(list(m.envelope.rcpt_tos)) for m in msgs],
        [len(m.data) for m in msgs],
        [m.received_at for m in msgs],
        [m.dedupe for m in msgs],
        [dumps(meta) for meta in metas],
        [m.data for m in msgs],
        [dumps(m.received) for m in msgs],
        CHANNEL,
        [
            look_text(m.envelope.mail_from, meta["rcpts_original"], meta.get("subject"))
            for m, meta in zip(msgs, metas, strict=True)
        ],
    )
    inserted = {r["id"] for r in rows}
    return [m.id in inserted for m in msgs]


async def export_batch(conn: asyncpg.Connection, *, after: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS}, dedupe FROM messages WHERE id > $1 ORDER BY id LIMIT 200", after
    )
    out = []
    for r in rows:
        out.append(
            {
                **row_of(r).as_dict(),
                "dedupe": r["dedupe"],
                "body": await conn.fetchval("SELECT data FROM bodies WHERE id = $1", r["id"]),
                "events": await timeline(conn, r["id"]),
            }
        )
    return out


async def import_record(conn: asyncpg.Connection, rec: dict[str, Any]) -> bool:
    """Store an export record as it was; a lease it had is dropped (the work is due)."""
    added = await conn.fetchval(
        f"INSERT INTO messages ({IMPORT_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13::jsonb)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        *import_values(rec),
    )
    if added is None:
        return False
    meta = rec["meta"]
    look = look_text(rec["mail_from"], meta.get("rcpts_original") or [], meta.get("subject"))
    await conn.execute("INSERT INTO message_look (id, look) VALUES ($1, $2)", rec["id"], look)
    if rec["body"] is not None:
        await conn.execute("INSERT INTO bodies (id, data) VALUES ($1, $2)", rec["id"], rec["body"])
    events = [
        (
            rec["id"],
            EventType(ev["type"]),
            ev["at"],
            event_detail(ev),
        )
        for ev in rec["events"]
    ]
    await add_events(conn, events)
    return True


def _like(text: str) -> str:
    """An ILIKE pattern that finds `text` anywhere, wildcards escaped (`\\` is the escape)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def find(conn: asyncpg.Connection, query: MessageQuery) -> list[MessageRow]:
    """Up to `query.limit` messages matching the query, newest (highest id) first."""
    where: list[str] = []
    params: list[Any] = []

    def add(sql: str, value: Any) -> None:
        params.append(value)
        where.append(sql.replace("?", f"${len(params)}"))

    if query.before:
        add("id < ?", query.before)
    if query.state:
        add("state = ?", query.state)
    for sql, value in kind_conditions(query.kind) if query.kind else ():
        add(sql, value)
    if query.since is not None:
        add("created >= ?", query.since)
    if query.until is not None:
        add("created < ?", query.until)
    looks = look_filters(query)
    if looks:
        # The narrow table first (and the cursor with it, so a deep page scans less).
        inner = " AND ".join(f"look LIKE ${len(params) + i + 1}" for i in range(len(looks)))
        params.extend(looks)
        if query.before:
            inner += f" AND id < ${len(params) + 1}"
            params.append(query.before)
        where.append(f"id IN (SELECT id FROM message_look WHERE {inner})")
    if query.upstream:
        add("(meta->>'upstream') ILIKE ?", _like(query.upstream))
    sql = f"SELECT {COLUMNS} FROM messages"
    if where:
        sql += " WHERE " + " AND ".join(where)
    params.append(query.limit)
    sql += f" ORDER BY id DESC LIMIT ${len(params)}"
    return [row_of(r) for r in await conn.fetch(sql, *params)]


# -- provider events (relay.events) ----------------------------------------------------------


async def find_by_provider_id(conn: asyncpg.Connection, keys: list[str]) -> str | None:
    """The newest message handed over under one of `keys` (ids sort by arrival)."""
    found: str | None = await conn.fetchval(
        "SELECT max(msg_id) FROM provider_ids WHERE key = ANY($1::text[])", keys
    )
    return found


async def _locked(conn: asyncpg.Connection, msg_id: str) -> MessageRow:
    """The message's row, locked until the transaction ends (a dispatcher's round waits)."""
    r = await conn.fetchrow(f"SELECT {COLUMNS} FROM messages WHERE id = $1 FOR UPDATE", msg_id)
    if r is None:
        raise QueueActionError(f"no message {msg_id} in the queue")
    return row_of(r)


async def _first_key(conn: asyncpg.Connection, key: str, msg_id: str) -> bool:
    """Remember an event's key; False when it was recorded before."""
    taken = await conn.fetchval(
        "INSERT INTO delivery_keys (key, msg_id) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        key,
        msg_id,
    )
    return taken is not None


async def record_delivery(conn: asyncpg.Connection, rec: DeliveryRecord) -> bool:
    """A provider's event on the timeline and the recipient's status, once per key."""
    row = await _locked(conn, rec.msg_id)
    if not await _first_key(conn, rec.key, rec.msg_id):
        return False
    await add_events(conn, [(rec.msg_id, rec.type, rec.at, rec.detail)])
    statuses = status_meta(row.meta, rec)
    if statuses is not None:
        await conn.execute(
            "UPDATE messages SET meta = jsonb_set(meta, '{rcpts_status}', $2::jsonb) WHERE id = $1",
            rec.msg_id,
            dumps(statuses),
        )
    return True


async def requeue(
    conn: asyncpg.Connection,
    msg_id: str,
    rcpts: list[str],
    *,
    exclude: str,
    now: float,
    reason: str,
    key: str,
) -> str | None:
    """Recipients a provider dropped, due again for another upstream (`Queue.requeue`).
    The message's kind when done (and announced), None when `key` was used before."""
    row = await _locked(conn, msg_id)
    if not await _first_key(conn, key, msg_id):
        return None
    # Raised after the key is taken: the transaction's rollback takes it back.
    if row.state == Status.SENDING:
        raise QueueBusy(busy(msg_id))
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM bodies WHERE id = $1)", msg_id):
        raise QueueActionError(not_kept(msg_id))
    await conn.execute(
        "UPDATE messages SET state = $2, rcpts = $3::jsonb, next_attempt = $4, updated = $4,"
        " last_error = $5, meta = $6::jsonb WHERE id = $1",
        msg_id,
        requeued_state(row.state),
        dumps(requeued_rcpts(row.state, row.rcpts, rcpts)),
        now,
        reason,
        dumps(requeued_meta(row.meta, rcpts, exclude=exclude, now=now)),
    )
    detail = {"recipients": rcpts, "upstream": exclude, "reason": reason}
    await add_events(conn, [(msg_id, EventType.REQUEUED, now, detail)])
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, row.kind)
    return row.kind


#: Bodies dropped per transaction, so a long backlog never holds its locks for long.
DROP_BATCH = 1000


async def drop_bodies(conn: asyncpg.Connection, *, sent_before: float) -> int:
    """Up to DROP_BATCH kept bodies of messages sent before `sent_before`."""
    dropped: int = await conn.fetchval(
        "WITH gone AS (DELETE FROM bodies WHERE id IN (SELECT b.id FROM bodies b"
        " JOIN messages m ON m.id = b.id WHERE m.state = 'sent' AND m.updated < $1"
        " LIMIT $2) RETURNING 1) SELECT count(*) FROM gone",
        sent_before,
        DROP_BATCH,
    )
    return dropped


#: Expired nonces forgotten per use: enough to keep up with the arrivals, never a long walk.
NONCE_SWEEP = 100


async def forget_use(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute("DELETE FROM nonces WHERE key = $1", key)


async def first_use(conn: asyncpg.Connection, key: str, *, now: float, expires: float) -> bool:
    """Remember `key` until `expires`; False while it is remembered already. A few other
    expired keys are forgotten in the same statement, so the table stays the size of the
    replay window (the key itself is left to the upsert: one statement can't do both)."""
    taken = await conn.fetchval(
        "WITH swept AS (DELETE FROM nonces WHERE key IN (SELECT key FROM nonces"
        " WHERE expires < $3 AND key <> $1 LIMIT $4 FOR UPDATE SKIP LOCKED))"
        " INSERT INTO nonces (key, expires) VALUES ($1, $2) ON CONFLICT (key)"
        " DO UPDATE SET expires = EXCLUDED.expires WHERE nonces.expires < $3 RETURNING 1",
        key,
        expires,
        now,
        NONCE_SWEEP,
    )
    return taken is not None
