"""What provider events do to a message's row, computed the same way for both engines.

The engines differ in how they read and write a row (SQLite's JSON text, PostgreSQL's
jsonb under a row lock); the rules of a requeue and of a recipient's status are here once,
so a message treated by one engine reads the same after an export into the other.
"""

from __future__ import annotations

from typing import Any

from relay.message import Status
from relay.queue.base import DeliveryRecord, status_after

#: Where a requeue adds to the recipients still to do instead of replacing them: the
#: message is still waiting for others, whose turn must not be lost.
_WAITING = (Status.QUEUED, Status.DEFERRED, Status.HELD)


def not_kept(msg_id: str) -> str:
    """The refusal of a requeue whose body is gone, said so an operator knows what to do."""
    return (
        f"message {msg_id}: its body is no longer kept, so it cannot be sent again through"
        " another upstream; raise [events] keep_body if provider drops arrive later than that"
    )


def busy(msg_id: str) -> str:
    return f"message {msg_id} is being delivered right now; ask again once the attempt ends"


def status_meta(meta: dict[str, Any], rec: DeliveryRecord) -> dict[str, Any] | None:
    """meta.rcpts_status after `rec` (None when the record sets no status)."""
    if rec.status is None:
        return None
    statuses = dict(meta.get("rcpts_status") or {})
    old = statuses.get(rec.rcpt)
    statuses[rec.rcpt] = {
        "status": status_after(old["status"] if old else None, rec.status),
        "at": rec.at,
        "upstream": rec.detail.get("upstream"),
    }
    return statuses


def requeued_rcpts(state: str, pending: list[str], rcpts: list[str]) -> list[str]:
    """The recipients to do after a requeue: those still waiting (in their order) and the
    requeued ones; a sent or failed message has nobody else left to do."""
    base = list(pending) if state in _WAITING else []
    return base + [r for r in dict.fromkeys(rcpts) if r not in base]


def requeued_meta(
    meta: dict[str, Any], rcpts: list[str], *, exclude: str, now: float
) -> dict[str, Any]:
    """meta after a requeue: the upstream excluded for good, the recipients' status
    "requeued", their earlier outcome (done, or failed) forgotten, and the retry window
    starting now."""
    meta = dict(meta)
    excluded = list(meta.get("excluded_upstreams") or [])
    if exclude and exclude not in excluded:
        excluded.append(exclude)
    meta["excluded_upstreams"] = excluded
    # A fresh retry.max_age window for the re-send, as an operator's retry gets: the days
    # the message may have waited before its first hand-over are not held against it.
    meta["retried_at"] = now
    statuses = dict(meta.get("rcpts_status") or {})
    for rcpt in rcpts:
        statuses[rcpt] = {"status": "requeued", "at": now, "upstream": exclude}
    meta["rcpts_status"] = statuses
    for key in ("rcpts_failed", "rcpts_done"):
        if key in meta:
            kept = {r: v for r, v in (meta[key] or {}).items() if r not in rcpts}
            if kept:
                meta[key] = kept
            else:
                del meta[key]
    return meta


def requeued_state(state: str) -> str:
    """A held message stays held (the operator's hold wins); anything else is due now."""
    return Status.HELD.value if state == Status.HELD else Status.QUEUED.value
