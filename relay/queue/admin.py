"""Operator actions on the queue (Postfix's postsuper/postqueue), one copy for every door.

The CLI and the HTTP API call these; each names its actor ("cli:alice", "api:ops"), which
goes on the message's timeline, and each is logged, so "who deleted it" has an answer on
the server side too. They work on either engine, whether or not a server runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.queue.base import MessageRow, Queue, QueueActionError

log = logging.getLogger("relay.queue")


@dataclass(slots=True)
class MessageView:
    message: MessageRow
    timeline: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message.as_dict(), "timeline": self.timeline}


class QueueAdmin:
    def __init__(self, queue: Queue, *, clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.clock = clock

    async def show(self, msg_id: str) -> MessageView:
        row = await self.queue.get(msg_id)
        if row is None:
            raise QueueActionError(f"no message {msg_id} in the queue")
        return MessageView(row, await self.queue.timeline(msg_id))

    async def search(
        self, *, state: str | None = None, kind: str | None = None, limit: int = 1000
    ) -> list[MessageRow]:
        return await self.queue.search(state=state, kind=kind, limit=limit)

    async def hold(self, msg_id: str, *, actor: str) -> None:
        await self.queue.hold(msg_id, now=self.clock(), actor=actor)
        log.info("%s held by %s", msg_id, actor)

    async def release(self, msg_id: str, *, actor: str) -> None:
        await self.queue.release(msg_id, now=self.clock(), actor=actor)
        log.info("%s released by %s", msg_id, actor)

    async def retry(self, msg_id: str, *, actor: str) -> None:
        await self.queue.retry(msg_id, now=self.clock(), actor=actor)
        log.info("%s queued again by %s", msg_id, actor)

    async def retry_failed(self, *, actor: str) -> list[str]:
        ids = await self.queue.retry_failed(now=self.clock(), actor=actor)
        log.info("%d failed message(s) queued again by %s", len(ids), actor)
        return ids

    async def delete(self, msg_id: str, *, actor: str) -> None:
        await self.queue.delete(msg_id, actor=actor)
        log.warning("%s deleted by %s", msg_id, actor)

    async def flush(self, *, actor: str) -> list[str]:
        ids = await self.queue.flush(now=self.clock(), actor=actor)
        log.info("%d deferred message(s) made due by %s", len(ids), actor)
        return ids
