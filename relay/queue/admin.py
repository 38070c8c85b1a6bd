"""Operator actions on the queue (Postfix's postsuper/postqueue), one copy for every door.

The CLI and the HTTP API call these; each names its actor ("cli:alice", "api:ops"), which
goes on the message's timeline, and each is logged, so "who deleted it" has an answer on
the server side too. They work on either engine, whether or not a server runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from relay.queue.base import MessageRow, Queue, QueueActionError, UpstreamAction, UpstreamShare

log = logging.getLogger("relay.queue")

MessageAction = Literal["retry", "hold", "release", "delete"]
MESSAGE_ACTIONS: tuple[MessageAction, ...] = ("retry", "hold", "release", "delete")


@dataclass(slots=True)
class MessageView:
    message: MessageRow
    timeline: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message.as_dict(), "timeline": self.timeline}


async def wake_waiting(queue: Queue, *, now: float, actor: str) -> list[str]:
    """Make due the mail deferred while no upstream could be tried (an upstream is back).
    A failure is logged, not raised: that mail keeps its retry times, nothing is lost."""
    try:
        ids = await queue.flush(now=now, actor=actor, waiting_for_upstream=True)
    except Exception:
        log.exception("the mail waiting for an upstream keeps its retry times (%s)", actor)
        return []
    if ids:
        log.info("%d message(s) waiting for an upstream made due by %s", len(ids), actor)
    return ids


class QueueAdmin:
    def __init__(
        self,
        queue: Queue,
        *,
        clock: Callable[[], float] = time.time,
        routing_changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`routing_changed`: called after an upstream's shared state was changed here, so
        a router in this process adopts it at once (the others at their next sync)."""
        self.queue = queue
        self.clock = clock
        self.routing_changed = routing_changed

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

    async def release(self, msg_id: str, *, actor: str) -> list[str]:
        probing = await self._probe_open_breakers(actor)
        await self.queue.release(msg_id, now=self.clock(), actor=actor)
        log.info("%s released by %s", msg_id, actor)
        return probing

    async def retry(self, msg_id: str, *, actor: str) -> list[str]:
        probing = await self._probe_open_breakers(actor)
        await self.queue.retry(msg_id, now=self.clock(), actor=actor)
        log.info("%s queued again by %s", msg_id, actor)
        return probing

    async def retry_failed(self, *, actor: str) -> tuple[list[str], list[str]]:
        probing = await self._probe_open_breakers(actor)
        ids = await self.queue.retry_failed(now=self.clock(), actor=actor)
        log.info("%d failed message(s) queued again by %s", len(ids), actor)
        return ids, probing

    async def delete(self, msg_id: str, *, actor: str) -> None:
        await self.queue.delete(msg_id, actor=actor)
        log.warning("%s deleted by %s", msg_id, actor)

    async def act(self, msg_id: str, action: MessageAction, *, actor: str) -> list[str]:
        """One of MESSAGE_ACTIONS by name, for the doors that take it as a word (a CLI
        command, an API path, a page's button). The upstreams whose breakers probe now."""
        if action == "hold":
            await self.hold(msg_id, actor=actor)
        elif action == "delete":
            await self.delete(msg_id, actor=actor)
        elif action == "release":
            return await self.release(msg_id, actor=actor)
        else:
            return await self.retry(msg_id, actor=actor)
        return []

    async def flush(self, *, actor: str) -> tuple[list[str], list[str]]:
        probing = await self._probe_open_breakers(actor)
        ids = await self.queue.flush(now=self.clock(), actor=actor)
        log.info("%d deferred message(s) made due by %s", len(ids), actor)
        return ids, probing

    async def _probe_open_breakers(self, actor: str) -> list[str]:
        """An operator who retries or flushes wants an attempt now: an upstream whose
        breaker is open probes at once instead of after its cooldown. The upstreams named.

        Asked before the messages are made due: a dispatcher that picked one up first
        would find the breaker still open and defer it for another cooldown."""
        rows = await self.upstreams()
        open_now = [name for name, row in rows.items() if row.breaker == "open"]
        if open_now:
            await self.queue.routing.act(open_now, "probe", now=self.clock(), cooldown=0.0)
            await self._adopt()
            log.info("breakers of %s probe now, asked by %s", ", ".join(open_now), actor)
        return open_now

    # -- upstreams (relay upstream list|reset|pause|resume) --------------------------------

    async def upstreams(self) -> dict[str, UpstreamShare]:
        """Every upstream's shared state as the relay's processes last reported it."""
        return await self.queue.routing.sync([], now=self.clock(), half_life=60.0)

    async def upstream_action(
        self, name: str, action: UpstreamAction, *, actor: str, cooldown: float
    ) -> UpstreamShare:
        rows = await self.queue.routing.act([name], action, now=self.clock(), cooldown=cooldown)
        log.warning("upstream %s: %s by %s", name, action, actor)
        await self._adopt()
        if action in ("reset", "resume"):  # what waited for an upstream goes now
            await wake_waiting(self.queue, now=self.clock(), actor=actor)
        return rows[name]

    async def _adopt(self) -> None:
        if self.routing_changed is not None:
            await self.routing_changed()
