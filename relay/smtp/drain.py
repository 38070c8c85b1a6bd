"""Ending SMTP service at shutdown without failing a client in the middle of a message.

RFC 5321 3.8 lets a server close a connection only after QUIT or after a `421` saying the
service is shutting down, which it may send at the next command or, when the client
cannot be expected to send one, at once. So at SIGTERM:

1. The listening sockets close at once, so a restarted relay (or another worker on the
   same port) can take them. Connections the kernel had already completed but the relay
   had not yet accepted are accepted and answered `421 4.3.2` rather than reset.
2. A session between transactions (before MAIL, or after the reply to DATA or RSET) gets
   `421 4.3.2` when its current command is answered, or at once when it is waiting.
3. A session inside a transaction (MAIL .. the end of DATA) may finish it within the
   grace period; its 250 still means durable (invariant 1), then it gets its 421.
4. When the grace ends, every session left gets its 421 and is closed; a message whose
   content was still arriving is not accepted, and its client sends it again later. One
   whose content is being stored is let finish (the fsync is short), so that no client
   is told nothing about a message that was in fact queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("relay.smtp")

# After the grace, how long a session storing its message may take before it is cut.
STORE_LIMIT = 10.0


class DrainableSession(Protocol):
    def drain_check(self) -> None:
        """The drain began or its grace ended: close now (421) if this session may not
        go on, else at the end of the command it is running."""

    def abort(self) -> None:
        """Close the connection at once, without a reply (the last resort)."""


@dataclass
class Listening:
    """A bound SMTP listener and what makes its connections (for the backlog at close)."""

    server: asyncio.Server
    factory: Callable[[], asyncio.BaseProtocol]
    tls: ssl.SSLContext | None  # an implicit-TLS listener's context


@dataclass
class DrainReport:
    """What the drain did, for the one log line at the end of a shutdown."""

    open_at_start: int = 0
    backlog: int = 0  # connections accepted from the kernel's queue only to get 421
    over_grace: int = 0  # sessions still open when the grace ended (they got 421)
    aborted: int = 0  # sessions still storing STORE_LIMIT seconds after the grace


@dataclass
class Sessions:
    """This process's SMTP listeners and open sessions, and their drain at shutdown."""

    listeners: list[Listening] = field(default_factory=list)
    open: set[DrainableSession] = field(default_factory=set)
    draining: bool = False
    grace_over: bool = False
    report: DrainReport = field(default_factory=DrainReport)
    _empty: asyncio.Event = field(default_factory=asyncio.Event)
    _hurry: asyncio.Event = field(default_factory=asyncio.Event)
    _backlog_tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._empty.set()

    def add(self, session: DrainableSession) -> None:
        self.open.add(session)
        self._empty.clear()

    def discard(self, session: DrainableSession) -> None:
        self.open.discard(session)
        if not self.open:
            self._empty.set()

    def hurry(self) -> None:
        """End the grace now (a second SIGTERM or Ctrl-C)."""
        self._hurry.set()

    def begin(self) -> None:
        """Close the listeners and tell each session; `drain` then waits for them."""
        if self.draining:
            return
        self.draining = True
        self.report.backlog = self.close_listeners()
        self.report.open_at_start = len(self.open)
        for session in list(self.open):
            session.drain_check()

    async def drain(self, grace: float) -> DrainReport:
        """Begin (if not yet), then end the sessions as above; returns once all are closed."""
        self.begin()
        report = self.report
        if not await self._wait_empty(grace, hurry=True):
            report.over_grace = len(self.open)
            self.grace_over = True
            for session in list(self.open):
                session.drain_check()
            if not await self._wait_empty(STORE_LIMIT, hurry=False):
                report.aborted = len(self.open)
                for session in list(self.open):
                    session.abort()
        for task in self._backlog_tasks:
            task.cancel()
        await asyncio.gather(*self._backlog_tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the closed sessions' tasks see their cancellation
        return report

    def close_listeners(self) -> int:
        """Close every listening socket; returns how many queued connections were taken.

        A listening socket that closes resets the connections waiting in its accept
        queue. So a duplicate of it stays open just long enough to accept what is queued
        (without yielding to the event loop, nothing more can arrive in between but the
        last microseconds' connects); those connections are handed to the listener's
        protocol, which answers them 421 as the drain has begun.
        """
        taken = 0
        for listening in self.listeners:
            duplicates = []
            for sock in listening.server.sockets:
                with contextlib.suppress(OSError):
                    fd = os.dup(sock.fileno())
                    duplicates.append(socket.socket(fileno=fd))
            listening.server.close()
            for dup in duplicates:
                with dup:
                    for conn in _accept_queued(dup):
                        taken += 1
                        self._hand_over(listening, conn)
        return taken

    def _hand_over(self, listening: Listening, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        task: asyncio.Task[object] = asyncio.create_task(
            loop.connect_accepted_socket(listening.factory, conn, ssl=listening.tls)
        )
        self._backlog_tasks.add(task)
        task.add_done_callback(self._backlog_tasks.discard)

    async def _wait_empty(self, timeout: float, *, hurry: bool) -> bool:
        """True once no session is open; False after `timeout` (or a hurry)."""
        if self._empty.is_set():
            return True
        waiters = [asyncio.ensure_future(self._empty.wait())]
        if hurry:
            waiters.append(asyncio.ensure_future(self._hurry.wait()))
        try:
            await asyncio.wait(
                waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._empty.is_set()


def _accept_queued(listener: socket.socket) -> list[socket.socket]:
    """Every connection waiting in a listening socket's accept queue, without blocking."""
    listener.setblocking(False)
    accepted: list[socket.socket] = []
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError as exc:
            log.warning("accepting queued connections at shutdown: %s", exc)
            return accepted
        conn.setblocking(False)
        accepted.append(conn)
