"""Queue operations as plain functions of a sqlite3 connection.

(Over 500 lines on purpose: every SQL statement of the SQLite engine in one place, so the
lease and timeline rules that each statement keeps can be read side by side.)

Every state change writes its timeline event in the same transaction, so the timeline can
never disagree with the state.

The SQLite engine (`relay.queue.sqlite.engine`) runs them through `Spool.write`/`Spool.read`
(group-committed, off the event loop), and its operator actions run the same functions in
their own transactions on any shard. Nothing outside `relay.queue.sqlite` calls them.

Leases: a dispatcher claims a message by setting state=sending, lease_owner and
lease_until. Completing it checks the owner, so an operator's hold/delete or a recovery by
another process is never overwritten by a late result.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from relay.message import (
    Claimed,
    Envelope,
    EventType,
    Kind,
    NewMessage,
    Status,
    first_id_at,
    stored_meta,
)
from relay.queue.base import (
    IMPORT_COLUMNS,
    NO_UPSTREAM,
    DeliveryRecord,
    MessageQuery,
    MessageRow,
    QueueActionError,
    QueueBusy,
    Round,
    StoreError,
    event_detail,
    import_values,
    kind_conditions,
    look_filters,
    look_text,
    provider_keys,
    round_meta,
)
from relay.queue.delivery import (
    busy,
    not_kept,
    requeued_meta,
    requeued_rcpts,
    requeued_state,
    status_meta,
)
from relay.queue.sqlite.segments import SegmentFiles, SegmentMissing, SegmentWriter

log = logging.getLogger("relay.queue")


def _event(
    conn: sqlite3.Connection, msg_id: str, at: float, type_: EventType, detail: dict[str, Any]
) -> None:
    conn.execute(
        "INSERT INTO events (msg_id, at, type, detail) VALUES (?, ?, ?, ?)",
        (msg_id, at, type_.value, json.dumps(detail, separators=(",", ":"))),
    )


add_event = _event


def insert(conn: sqlite3.Connection, msg: NewMessage) -> bool:
    """Store a new message and its `received` event. False when `dedupe` was seen before."""
    env = msg.envelope
    meta = stored_meta(msg)
    cur = conn.execute(
        "INSERT INTO messages (id, kind, state, mail_from, rcpts, size, created, updated,"
        " next_attempt, dedupe, meta, look) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT DO NOTHING",
        (
            msg.id,
            msg.kind.value,
            Status.QUEUED.value,
            env.mail_from,
            json.dumps(list(env.rcpt_tos)),
            len(msg.data),
            msg.received_at,
            msg.received_at,
            msg.received_at,
            msg.dedupe,
            json.dumps(meta),
            look_text(env.mail_from, meta["rcpts_original"], meta.get("subject")),
        ),
    )
    if cur.rowcount == 0:
        return False
    _store_body(conn, msg.id, msg.data)
    _event(conn, msg.id, msg.received_at, EventType.RECEIVED, msg.received)
    return True


# -- bodies: inline blobs or (segment, offset, length) ---------------------------------------

#: Bodies up to this many bytes stay in SQLite as blobs: below it the blob's extra copies
#: cost less than a second fsync per batch (the segment's). bench/store.py measures both;
#: set it very high to store every body inline.
INLINE_MAX = 16 * 1024


def _segments(conn: sqlite3.Connection) -> SegmentFiles | None:
    found = getattr(conn, "segments", None)
    return found if isinstance(found, SegmentFiles) else None


def _store_body(conn: sqlite3.Connection, msg_id: str, data: bytes) -> None:
    """Append a large body to the shard's active segment when this connection is the
    shard owner's writer (the batch's COMMIT follows the segment's fdatasync); inline
    otherwise (small bodies, an operator's import, a connection of another process)."""
    writer = _segments(conn)
    if isinstance(writer, SegmentWriter) and len(data) > INLINE_MAX:
        seq, offset = writer.append(data)
        conn.execute(
            "INSERT INTO bodies (id, data, seg, off, len) VALUES (?, x'', ?, ?, ?)",
            (msg_id, seq, offset, len(data)),
        )
    else:
        conn.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (msg_id, data))


def _body_row(conn: sqlite3.Connection, msg_id: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(
        "SELECT data, seg, off, len FROM bodies WHERE id = ?", (msg_id,)
    ).fetchone()
    return row


def _load(conn: sqlite3.Connection, row: tuple[Any, ...]) -> bytes:
    data, seq, offset, length = row
    if seq is None:
        return bytes(data)
    files = _segments(conn)
    if files is None:
        # Not the body's fault (a connection opened without the shard's segments): an
        # error of the store, never a reason to hold the message (see `claim`).
        raise StoreError("this connection cannot read message body segments")
    return files.read(seq, offset, length)


def has_body(conn: sqlite3.Connection, msg_id: str) -> bool:
    return conn.execute("SELECT 1 FROM bodies WHERE id = ?", (msg_id,)).fetchone() is not None


def segment_usage(conn: sqlite3.Connection, seq: int) -> tuple[int, int]:
    """(bodies, bytes) still stored in a segment (through the partial index bodies_seg)."""
    count, live = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(len), 0) FROM bodies WHERE seg = ?", (seq,)
    ).fetchone()
    return int(count), int(live)


def segment_bodies(conn: sqlite3.Connection, seq: int, *, limit: int) -> list[tuple[str, int, int]]:
    """Up to `limit` bodies of a segment, (id, offset, length), in file order."""
    return [
        (str(r[0]), int(r[1]), int(r[2]))
        for r in conn.execute(
            "SELECT id, off, len FROM bodies WHERE seg = ? ORDER BY off LIMIT ?", (seq, limit)
        )
    ]


def move_body(
    conn: sqlite3.Connection, msg_id: str, *, old: tuple[int, int], new: tuple[int, int]
) -> bool:
    """Point a body at its copy, unless it was deleted or moved meanwhile."""
    cur = conn.execute(
        "UPDATE bodies SET seg = ?, off = ? WHERE id = ? AND seg = ? AND off = ?",
        (*new, msg_id, *old),
    )
    return cur.rowcount == 1


def claim(
    conn: sqlite3.Connection,
    *,
    kind: Kind,
    owner: str,
    now: float,
    lease_time: float,
    limit: int,
    partition: int = 0,
) -> list[Claimed]:
    """Lease up to `limit` due messages of one kind, oldest due first."""
    rows = conn.execute(
        "UPDATE messages SET state = 'sending', lease_owner = ?, lease_until = ?"
        " WHERE id IN (SELECT id FROM messages WHERE kind = ? AND state IN"
        " ('queued', 'deferred') AND next_attempt <= ? ORDER BY next_attempt LIMIT ?)"
        " RETURNING id, mail_from, rcpts, created, attempts, meta",
        (owner, now + lease_time, kind.value, now, limit),
    ).fetchall()
    claimed = []
    for msg_id, mail_from, rcpts, created, attempts, meta_json in rows:
        row = _body_row(conn, msg_id)
        try:
            data = _load(conn, row) if row else b""
        except SegmentMissing as exc:
            _hold_unreadable(conn, msg_id, now=now, reason=str(exc))
            continue
        meta = json.loads(meta_json)
        env = Envelope(
            mail_from,
            tuple(json.loads(rcpts)),
            smtputf8=bool(meta.get("smtputf8")),
            body_8bit=bool(meta.get("8bit")),
            crlf_only=bool(meta.get("crlf")),
            queue_id=msg_id,
        )
        claimed.append(
            Claimed(
                msg_id,
                kind,
                env,
                data,
                created,
                attempts,
                meta,
                partition,
            )
        )
    return claimed


def _hold_unreadable(conn: sqlite3.Connection, msg_id: str, *, now: float, reason: str) -> None:
    """A message whose body cannot be read is held, named in its timeline and the log,
    instead of failing the whole claim (it is the oldest due: every claim of the shard
    would hit it again, and nothing behind it would be sent)."""
    log.error("message %s held: %s", msg_id, reason)
    conn.execute(
        "UPDATE messages SET state = 'held', lease_owner = NULL, lease_until = NULL,"
        " updated = ?, last_error = ?, meta = json_set(meta, '$.held_from', 'deferred')"
        " WHERE id = ?",
        (now, reason, msg_id),
    )
    _event(conn, msg_id, now, EventType.HELD, {"by": "relay", "reason": reason})


def next_due(conn: sqlite3.Connection, kind: Kind) -> float | None:
    row = conn.execute(
        "SELECT MIN(next_attempt) FROM messages WHERE kind = ? AND state IN ('queued', 'deferred')",
        (kind.value,),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def _finish(
    conn: sqlite3.Connection, msg_id: str, owner: str, sql_set: str, params: tuple[Any, ...]
) -> bool:
    cur = conn.execute(
        f"UPDATE messages SET {sql_set}, lease_owner = NULL, lease_until = NULL"
        " WHERE id = ? AND state = 'sending' AND lease_owner = ?",
        (*params, msg_id, owner),
    )
    return cur.rowcount == 1


def complete(
    conn: sqlite3.Connection,
    msg_id: str,
    *,
    owner: str,
    now: float,
    attempts: int,
    detail: dict[str, Any],
    keep_body: bool = False,
) -> bool:
    """Every recipient is done: state sent. The body goes, unless a provider's events may
    still send it elsewhere (`keep_body`: `drop_bodies` removes it later)."""
    if not _finish(
        conn,
        msg_id,
        owner,
        "state = 'sent', rcpts = '[]', updated = ?, attempts = ?, last_error = NULL",
        (now, attempts),
    ):
        return False
    if not keep_body:
        conn.execute("DELETE FROM bodies WHERE id = ?", (msg_id,))
    _event(conn, msg_id, now, EventType.SENT, detail)
    return True


def defer(
    conn: sqlite3.Connection,
    msg_id: str,
    *,
    owner: str,
    now: float,
    attempts: int,
    next_attempt: float,
    rcpts: tuple[str, ...],
    reason: str,
    detail: dict[str, Any],
) -> bool:
    if not _finish(
        conn,
        msg_id,
        owner,
        "state = 'deferred', rcpts = ?, updated = ?, attempts = ?,"
        " next_attempt = ?, last_error = ?",
        (json.dumps(list(rcpts)), now, attempts, next_attempt, reason),
    ):
        return False
    _event(
        conn,
        msg_id,
        now,
        EventType.DEFERRED,
        {"reason": reason, "next_attempt": next_attempt, **detail},
    )
    return True


def fail(
    conn: sqlite3.Connection,
    msg_id: str,
    *,
    owner: str,
    now: float,
    attempts: int,
    reason: str,
    detail: dict[str, Any],
) -> bool:
    """Permanent failure. The body is kept so an operator can inspect or retry it."""
    if not _finish(
        conn,
        msg_id,
        owner,
        "state = 'failed', updated = ?, attempts = ?, last_error = ?",
        (now, attempts, reason),
    ):
        return False
    _event(conn, msg_id, now, EventType.FAILED, {"reason": reason, **detail})
    return True


def release_lease(conn: sqlite3.Connection, msg_id: str, *, owner: str, now: float) -> bool:
    """Give a claimed message back untouched (shutdown while it waited for an upstream)."""
    return _finish(conn, msg_id, owner, "state = 'queued', updated = ?", (now,))


def recover(
    conn: sqlite3.Connection, *, now: float, alive: Callable[[str], bool] = lambda owner: False
) -> list[str]:
    """Make messages leased by dead processes due again. Returns their ids.

    A lease is dead when it expired, or when `alive(owner)` says its process is gone (a
    restart on the same queue knows at once that its previous incarnation died, without
    waiting for the lease to run out).
    """
    rows = conn.execute(
        "SELECT id, lease_owner, lease_until FROM messages WHERE state = 'sending'"
    ).fetchall()
    recovered = []
    for msg_id, owner, until in rows:
        if (until or 0) > now and alive(owner or ""):
            continue
        conn.execute(
            "UPDATE messages SET state = 'queued', next_attempt = ?, updated = ?,"
            " lease_owner = NULL, lease_until = NULL WHERE id = ?",
            (now, now, msg_id),
        )
        _event(
            conn,
            msg_id,
            now,
            EventType.RECOVERED,
            {"reason": f"lease of {owner} was abandoned (process stopped or crashed)"},
        )
        recovered.append(msg_id)
    return recovered


def record_round(
    conn: sqlite3.Connection, msg_id: str, *, owner: str, now: float, rounds: int, rnd: Round
) -> bool:
    """The round's attempts and the item's new state, in one transaction; nothing at all
    when the lease was lost meanwhile."""
    holds = conn.execute(
        "SELECT meta FROM messages WHERE id = ? AND state = 'sending' AND lease_owner = ?",
        (msg_id, owner),
    ).fetchone()
    if holds is None:
        return False
    for type_, at, detail in rnd.events:
        _event(conn, msg_id, at, type_, detail)
    keys = [(k, msg_id) for d in rnd.delivered for k in provider_keys(d.get("provider_id"))]
    if keys:
        conn.executemany(
            "INSERT INTO provider_ids (key, msg_id) VALUES (?, ?) ON CONFLICT DO NOTHING", keys
        )
    if rnd.delivered and (rnd.retry or rnd.failure):
        _event(conn, msg_id, now, EventType.NOTE, {"partial": True, "delivered": rnd.delivered})
    patch, done = round_meta(rnd, now=now)
    if patch or done:
        meta = json.loads(holds[0])
        meta.update(patch)
        if done:
            meta["rcpts_done"] = {**(meta.get("rcpts_done") or {}), **done}
        conn.execute(
            "UPDATE messages SET meta = ? WHERE id = ?",
            (json.dumps(meta, separators=(",", ":")), msg_id),
        )
    if rnd.retry:
        return defer(
            conn,
            msg_id,
            owner=owner,
            now=now,
            attempts=rounds,
            next_attempt=rnd.next_attempt,
            rcpts=rnd.pending,
            reason=rnd.reason,
            detail=rnd.defer_detail,
        )
    if rnd.failure is not None:
        return fail(
            conn,
            msg_id,
            owner=owner,
            now=now,
            attempts=rounds,
            reason=rnd.failure,
            detail=rnd.fail_detail,
        )
    return complete(
        conn,
        msg_id,
        owner=owner,
        now=now,
        attempts=rounds,
        detail=rnd.sent_detail,
        keep_body=rnd.keep_body,
    )


def purge_history(conn: sqlite3.Connection, *, state: Status, older_than: float) -> int:
    """Forget messages (and their timelines) that ended in `state` before `older_than`."""
    # A message finished before `older_than` arrived before it too: the id bound keeps
    # the walk of (state, id) to the candidates.
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM messages WHERE state = ? AND id < ? AND updated < ? LIMIT 5000",
            (state.value, first_id_at(older_than), older_than),
        )
    ]
    for msg_id in ids:
        _forget(conn, msg_id)
    return len(ids)


def _forget(conn: sqlite3.Connection, msg_id: str) -> None:
    """A message and everything kept about it (purged, or deleted by an operator)."""
    conn.execute("DELETE FROM events WHERE msg_id = ?", (msg_id,))
    conn.execute("DELETE FROM bodies WHERE id = ?", (msg_id,))
    conn.execute("DELETE FROM provider_ids WHERE msg_id = ?", (msg_id,))
    conn.execute("DELETE FROM delivery_keys WHERE msg_id = ?", (msg_id,))
    conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,))


# -- reading -------------------------------------------------------------------------------

_COLUMNS = (
    "id, kind, state, mail_from, rcpts, size, created, updated, next_attempt,"
    " attempts, last_error, meta"
)


def _row(r: tuple[Any, ...]) -> MessageRow:
    return MessageRow(
        r[0],
        r[1],
        r[2],
        r[3],
        json.loads(r[4]),
        r[5],
        r[6],
        r[7],
        r[8],
        r[9],
        r[10],
        json.loads(r[11]),
    )


def list_messages(
    conn: sqlite3.Connection,
    *,
    state: str | None = None,
    kind: str | None = None,
    limit: int = 1000,
) -> list[MessageRow]:
    where, params = [], []
    if state:
        where.append("state = ?")
        params.append(state)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    sql = f"SELECT {_COLUMNS} FROM messages"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id LIMIT ?"
    return [_row(r) for r in conn.execute(sql, (*params, limit))]


def exists(conn: sqlite3.Connection, msg_id: str) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE id = ?", (msg_id,)).fetchone() is not None


def get(conn: sqlite3.Connection, msg_id: str) -> MessageRow | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (msg_id,)).fetchone()
    return _row(r) if r else None


def body(conn: sqlite3.Connection, msg_id: str) -> bytes | None:
    """The stored body, None when it is gone. A reader outside the shard's writer may have
    read the row just before a compaction moved the body and unlinked its old segment:
    the row read again names the new place."""
    for last in (False, True):
        row = _body_row(conn, msg_id)
        if row is None:
            return None
        try:
            return _load(conn, row)
        except SegmentMissing:
            if last or conn.in_transaction:
                raise
    return None  # not reached: the second try returns or raises


def timeline(conn: sqlite3.Connection, msg_id: str) -> list[dict[str, Any]]:
    return [
        {"at": at, "type": t, **json.loads(d)}
        for at, t, d in conn.execute(
            "SELECT at, type, detail FROM events WHERE msg_id = ? ORDER BY seq", (msg_id,)
        )
    ]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        state: n for state, n in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")
    }


# -- operator actions (postsuper / postqueue equivalents) -----------------------------------


def _require(conn: sqlite3.Connection, msg_id: str) -> MessageRow:
    row = get(conn, msg_id)
    if row is None:
        raise QueueActionError(f"no message {msg_id} in the queue")
    return row


def _busy(row: MessageRow, action: str) -> QueueActionError:
    return QueueActionError(
        f"message {row.id} is being delivered right now; {action} it once the attempt ends"
    )


def retry(conn: sqlite3.Connection, msg_id: str, *, now: float, actor: str) -> None:
    """Make a failed, held or deferred message due now (postsuper -r)."""
    row = _require(conn, msg_id)
    if row.state == Status.SENDING:
        raise _busy(row, "retry")
    if row.state == Status.SENT:
        raise QueueActionError(f"message {msg_id} was already sent; nothing to retry")
    if not has_body(conn, msg_id):
        raise QueueActionError(f"message {msg_id} has no stored body left to send")
    rcpts = row.rcpts
    if row.state == Status.FAILED:
        # Only the recipients that failed: the others already have their copy. A failed
        # message gets a new max_age window (meta.retried_at); its arrival time stays.
        rcpts = list(row.meta.get("rcpts_failed") or {}) or rcpts or row.meta["rcpts_original"]
    conn.execute(
        "UPDATE messages SET state = 'queued', next_attempt = ?, updated = ?, rcpts = ?,"
        " meta = CASE WHEN state = 'failed'"
        " THEN json_set(json_remove(meta, '$.rcpts_failed'), '$.retried_at', ?)"
        " ELSE json_remove(meta, '$.rcpts_failed') END WHERE id = ?",
        (now, now, json.dumps(rcpts), now, msg_id),
    )
    _event(conn, msg_id, now, EventType.RETRY, {"by": actor, "from_state": row.state})


def retry_failed(conn: sqlite3.Connection, *, now: float, actor: str) -> list[str]:
    ids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE state = 'failed'")]
    done = []
    for msg_id in ids:
        try:
            retry(conn, msg_id, now=now, actor=actor)
            done.append(msg_id)
        except QueueActionError:
            continue
    return done


def hold(conn: sqlite3.Connection, msg_id: str, *, now: float, actor: str) -> None:
    row = _require(conn, msg_id)
    if row.state == Status.SENDING:
        raise _busy(row, "hold")
    if row.state not in (Status.QUEUED, Status.DEFERRED):
        raise QueueActionError(
            f"message {msg_id} is {row.state}; only queued or deferred messages can be held"
        )
    conn.execute(
        "UPDATE messages SET state = 'held', updated = ?,"
        " meta = json_set(meta, '$.held_from', state) WHERE id = ?",
        (now, msg_id),
    )
    _event(conn, msg_id, now, EventType.HELD, {"by": actor})


def release(conn: sqlite3.Connection, msg_id: str, *, now: float, actor: str) -> None:
    row = _require(conn, msg_id)
    if row.state != Status.HELD:
        raise QueueActionError(f"message {msg_id} is {row.state}, not held")
    conn.execute(
        "UPDATE messages SET state = 'queued', next_attempt = ?, updated = ? WHERE id = ?",
        (now, now, msg_id),
    )
    _event(conn, msg_id, now, EventType.RELEASED, {"by": actor})


def delete(conn: sqlite3.Connection, msg_id: str, *, actor: str) -> None:
    row = _require(conn, msg_id)
    if row.state == Status.SENDING:
        raise _busy(row, "delete")
    _forget(conn, msg_id)


def flush(
    conn: sqlite3.Connection, *, now: float, actor: str, waiting_for_upstream: bool = False
) -> list[str]:
    """Deferred messages due now (postqueue -f); see `Queue.flush`."""
    sql = "SELECT id FROM messages WHERE state = 'deferred' AND next_attempt > ?"
    args: tuple[object, ...] = (now,)
    if waiting_for_upstream:
        sql += " AND substr(last_error, 1, ?) = ?"
        args += (len(NO_UPSTREAM), NO_UPSTREAM)
    ids = [r[0] for r in conn.execute(sql, args)]
    for msg_id in ids:
        conn.execute("UPDATE messages SET next_attempt = ? WHERE id = ?", (now, msg_id))
        _event(conn, msg_id, now, EventType.FLUSHED, {"by": actor})
    return ids


# -- provider events (relay.events) ------------------------------------------------------------


def find_by_provider_id(conn: sqlite3.Connection, keys: list[str]) -> str | None:
    """The newest message handed over under one of `keys` (ids sort by arrival)."""
    if not keys:
        return None
    marks = ",".join("?" * len(keys))
    row = conn.execute(
        f"SELECT max(msg_id) FROM provider_ids WHERE key IN ({marks})", keys
    ).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def _first_key(conn: sqlite3.Connection, key: str, msg_id: str) -> bool:
    """Remember an event's key; False when it was recorded before."""
    cur = conn.execute(
        "INSERT INTO delivery_keys (key, msg_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (key, msg_id),
    )
    return cur.rowcount == 1


def record_delivery(conn: sqlite3.Connection, rec: DeliveryRecord) -> bool:
    """A provider's event on the timeline and the recipient's status, once per key."""
    row = conn.execute("SELECT meta FROM messages WHERE id = ?", (rec.msg_id,)).fetchone()
    if row is None:
        raise QueueActionError(f"no message {rec.msg_id} in the queue")
    if not _first_key(conn, rec.key, rec.msg_id):
        return False
    _event(conn, rec.msg_id, rec.at, rec.type, rec.detail)
    statuses = status_meta(json.loads(row[0]), rec)
    if statuses is not None:
        conn.execute(
            "UPDATE messages SET meta = json_set(meta, '$.rcpts_status', json(?)) WHERE id = ?",
            (json.dumps(statuses, separators=(",", ":")), rec.msg_id),
        )
    return True


def requeue(
    conn: sqlite3.Connection,
    msg_id: str,
    rcpts: list[str],
    *,
    exclude: str,
    now: float,
    reason: str,
    key: str,
) -> str | None:
    """Recipients a provider dropped, due again for another upstream (`Queue.requeue`).
    The message's kind when done (for the wake-up), None when `key` was used before."""
    row = _require(conn, msg_id)
    if not _first_key(conn, key, msg_id):
        return None
    # Raised after the key is taken: the transaction (or its savepoint) takes it back.
    if row.state == Status.SENDING:
        raise QueueBusy(busy(msg_id))
    if not has_body(conn, msg_id):
        raise QueueActionError(not_kept(msg_id))
    meta = requeued_meta(row.meta, rcpts, exclude=exclude, now=now)
    conn.execute(
        "UPDATE messages SET state = ?, rcpts = ?, next_attempt = ?, updated = ?,"
        " last_error = ?, meta = ? WHERE id = ?",
        (
            requeued_state(row.state),
            json.dumps(requeued_rcpts(row.state, row.rcpts, rcpts)),
            now,
            now,
            reason,
            json.dumps(meta, separators=(",", ":")),
            msg_id,
        ),
    )
    detail = {"recipients": rcpts, "upstream": exclude, "reason": reason}
    _event(conn, msg_id, now, EventType.REQUEUED, detail)
    return row.kind


#: Bodies dropped per transaction, so a long backlog never holds the write lock for long.
DROP_BATCH = 1000


def drop_bodies(conn: sqlite3.Connection, *, sent_before: float) -> int:
    """Up to DROP_BATCH kept bodies of messages sent before `sent_before`. The bodies table
    holds only the live queue and the kept ones, so it is walked (CROSS JOIN: SQLite keeps
    that order), not the sent history through (state, id)."""
    cur = conn.execute(
        "DELETE FROM bodies WHERE id IN (SELECT b.id FROM bodies b CROSS JOIN messages m"
        " ON m.id = b.id WHERE m.state = 'sent' AND m.updated < ? LIMIT ?)",
        (sent_before, DROP_BATCH),
    )
    return cur.rowcount


# -- moving a queue between engines ----------------------------------------------------------


def export_rows(conn: sqlite3.Connection, *, after: str, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` messages with ids after `after`, each with its body and timeline
    (the record format of `Queue.export`)."""
    rows = conn.execute(
        f"SELECT {_COLUMNS}, dedupe FROM messages WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    ).fetchall()
    return [
        {
            **_row(r).as_dict(),
            "dedupe": r[12],
            "body": body(conn, r[0]),
            "events": timeline(conn, r[0]),
        }
        for r in rows
    ]


def import_row(conn: sqlite3.Connection, rec: dict[str, Any]) -> bool:
    """Store an export record as it was; a lease it had is dropped (the work is due)."""
    cur = conn.execute(
        f"INSERT INTO messages ({IMPORT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT DO NOTHING",
        import_values(rec),
    )
    if cur.rowcount == 0:
        return False
    look = look_text(
        rec["mail_from"], rec["meta"].get("rcpts_original") or [], rec["meta"].get("subject")
    )
    conn.execute("UPDATE messages SET look = ? WHERE id = ?", (look, rec["id"]))
    if rec["body"] is not None:
        _store_body(conn, rec["id"], rec["body"])
    for ev in rec["events"]:
        _event(conn, rec["id"], ev["at"], EventType(ev["type"]), event_detail(ev))
    return True


# -- the operator surface's search ------------------------------------------------------------


def _like(text: str) -> str:
    """A LIKE pattern (escape `\\`) that finds `text` anywhere (ASCII case-insensitive)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def find(conn: sqlite3.Connection, query: MessageQuery) -> list[MessageRow]:
    """Up to `query.limit` messages matching the query, newest (highest id) first.

    Text filters read the search text through `messages_look` (named, or the planner may
    take the primary key for a cursor and read whole rows instead)."""
    where: list[str] = []
    params: list[Any] = []
    if query.before:
        where.append("id < ?")
        params.append(query.before)
    if query.state:
        where.append("state = ?")
        params.append(query.state)
    for sql, value in kind_conditions(query.kind) if query.kind else ():
        where.append(sql)
        params.append(value)
    if query.since is not None:
        where.append("created >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("created < ?")
        params.append(query.until)
    looks = look_filters(query)
    for pattern in looks:
        where.append("look LIKE ? ESCAPE '\\'")
        params.append(pattern)
    if query.upstream:
        where.append("json_extract(meta, '$.upstream') LIKE ? ESCAPE '\\'")
        params.append(_like(query.upstream))
    sql = f"SELECT {_COLUMNS} FROM messages"
    if looks:
        sql += " INDEXED BY messages_look"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    return [_row(r) for r in conn.execute(sql, (*params, query.limit))]


def oldest(conn: sqlite3.Connection, states: tuple[str, ...]) -> float | None:
    if not states:
        return None
    # Ids sort by arrival: the first entry of each state in (state, id) is its oldest.
    found = [
        float(row[0])
        for state in states
        if (
            row := conn.execute(
                "SELECT created FROM messages WHERE state = ? ORDER BY id LIMIT 1", (state,)
            ).fetchone()
        )
        is not None
    ]
    return min(found) if found else None


def dedupe_holder(conn: sqlite3.Connection, dedupe: str) -> tuple[str, float] | None:
    """(id, arrival) of the message holding `dedupe`, if any."""
    row = conn.execute("SELECT id, created FROM messages WHERE dedupe = ?", (dedupe,)).fetchone()
    return None if row is None else (str(row[0]), float(row[1]))


def release_dedupe(conn: sqlite3.Connection, msg_id: str, dedupe: str, *, before: float) -> None:
    """The message lets go of its key, if it still holds it and arrived before `before`."""
    conn.execute(
        "UPDATE messages SET dedupe = NULL WHERE id = ? AND dedupe = ? AND created < ?",
        (msg_id, dedupe, before),
    )
