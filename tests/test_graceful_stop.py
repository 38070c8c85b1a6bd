"""Graceful stop: at SIGTERM no client is failed in the middle of a message and nothing
acknowledged is lost (RFC 5321 3.8: only `421` before closing a session that did not QUIT).

In-process first (Relay.stop while sessions are open, a delivery in flight), then a
rolling restart under load with real `relay serve` processes on one port and one queue.
"""

from __future__ import annotations

import asyncio
import email
import itertools
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.config import ConfigError, parse
from tests.conftest import RelayFactory, SMTPSink, make_message, smtp_upstream
from tests.fakes.relay_process import RelayProcess, free_port

SHUTTING_DOWN = "421 4.3.2 relay.test shutting down, try again later"


class Closed(Exception):
    """The relay closed the connection without a reply."""


@dataclass
class Session:
    """A line-level SMTP client: each step's reply is checked by the test, not hidden."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int) -> Session:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise Closed("connection closed" + (f" after {lines}" if lines else ""))
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        """True when the relay has closed the connection (end of stream, nothing more)."""
        return await self.reader.read() == b""

    async def start_message(self, subject: str) -> None:
        """EHLO'd session: MAIL, RCPT, DATA up to the 354."""
        assert (await self.command("MAIL FROM:<app@example.com>")).startswith("250")
        assert (await self.command("RCPT TO:<rcpt@example.org>")).startswith("250")
        assert (await self.command("DATA")).startswith("354")

    def send_body(self, data: bytes) -> None:
        self.writer.write(data)

    async def end_message(self) -> str:
        self.writer.write(b".\r\n")
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


async def greeted(port: int) -> Session:
    session = await Session.open(port)
    assert (await session.reply()).startswith("220")
    assert (await session.command("EHLO client.test")).startswith("250")
    return session


async def queue_counts(relay: Relay) -> dict[str, int]:
    """The queue's states after `relay` stopped: read by a fresh Relay on its files."""
    reader = Relay(relay.config)
    await reader.queue.start()
    try:
        return await reader.queue.counts()
    finally:
        await reader.queue.close()


# -- sessions ----------------------------------------------------------------------------


async def test_stop_lets_a_message_being_sent_finish_and_closes_idle_sessions_with_421(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(server={"shutdown_grace": "20s"})
    (port,) = relay.smtp_ports()
    sending = await greeted(port)
    await sending.start_message("in flight")
    sending.send_body(make_message("in flight")[:40])  # part of the content only
    resetting = await greeted(port)
    assert (await resetting.command("MAIL FROM:<app@example.com>")).startswith("250")
    idle = await greeted(port)

    stop = asyncio.create_task(relay.stop())
    # Idle: told at once, and closed.
    assert await idle.reply() == SHUTTING_DOWN
    assert await idle.closed()
    # Between transactions after RSET: answered, then told.
    assert (await resetting.command("RSET")).startswith("250")
    assert await resetting.reply() == SHUTTING_DOWN
    assert await resetting.closed()
    # Mid-DATA: the message is finished and acknowledged (durable), then the 421.
    sending.send_body(make_message("in flight")[40:])
    assert (await sending.end_message()).startswith("250 2.0.0 Ok: queued as ")
    assert await sending.reply() == SHUTTING_DOWN
    assert await sending.closed()
    await asyncio.wait_for(stop, 10)  # every session ended: no waiting for the grace

    report = relay.smtp_sessions.report
    assert (report.open_at_start, report.over_grace, report.aborted) == (3, 0, 0)
    assert await queue_counts(relay) == {"queued": 1}


async def test_a_second_signal_ends_the_grace_at_once(make_relay: RelayFactory) -> None:
    relay = await make_relay(server={"shutdown_grace": "60s"})
    session = await greeted(relay.smtp_ports()[0])
    assert (await session.command("MAIL FROM:<app@example.com>")).startswith("250")
    stop = asyncio.create_task(relay.stop())
    await asyncio.sleep(0)  # the stop's first step, before any await: the listeners close
    relay.hurry()  # what serve() does on a second SIGTERM or Ctrl-C
    assert await session.reply() == SHUTTING_DOWN
    await asyncio.wait_for(stop, 10)
    assert relay.smtp_sessions.report.over_grace == 1


async def test_a_new_connection_after_stop_began_is_refused(make_relay: RelayFactory) -> None:
    relay = await make_relay(server={"shutdown_grace": "20s"})
    (port,) = relay.smtp_ports()
    holding = await greeted(port)
    assert (await holding.command("MAIL FROM:<app@example.com>")).startswith("250")
    stop = asyncio.create_task(relay.stop())
    await asyncio.sleep(0)  # the stop's first step, before any await: the listeners close
    assert relay.smtp_sessions.draining
    with pytest.raises(ConnectionRefusedError):
        await Session.open(port)
    # readiness says so meanwhile (load balancers stop sending)
    assert any("shutting down" in p for p in await relay.readiness_problems())
    assert (await holding.command("QUIT")).startswith("221")
    await asyncio.wait_for(stop, 10)


async def test_sessions_that_overstay_the_grace_get_421_and_their_message_is_not_taken(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(server={"shutdown_grace": "300ms"})
    (port,) = relay.smtp_ports()
    mid_data = await greeted(port)
    await mid_data.start_message("too slow")
    mid_data.send_body(make_message("too slow")[:30])
    mid_envelope = await greeted(port)
    assert (await mid_envelope.command("MAIL FROM:<app@example.com>")).startswith("250")

    await asyncio.wait_for(relay.stop(), 10)
    for session in (mid_data, mid_envelope):
        assert await session.reply() == SHUTTING_DOWN
        assert await session.closed()
    report = relay.smtp_sessions.report
    assert (report.open_at_start, report.over_grace, report.aborted) == (2, 2, 0)
    assert await queue_counts(relay) == {}


async def test_connections_queued_in_the_backlog_at_stop_get_421_not_a_reset(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay()
    (port,) = relay.smtp_ports()
    # Blocking connects while the event loop does not run: the kernel completes them and
    # queues them; the relay has not accepted them when its listener closes.
    queued = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    relay.smtp_sessions.begin()
    try:
        for sock in queued:
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            assert await Session(reader, writer).reply() == SHUTTING_DOWN
            assert await reader.read() == b""
            writer.close()
    finally:
        await relay.stop()
    assert relay.smtp_sessions.report.backlog == 3


async def test_pipelined_commands_after_the_421_are_not_answered(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(server={"shutdown_grace": "20s"})
    (port,) = relay.smtp_ports()
    session = await greeted(port)
    await session.start_message("pipelined")
    idle = await greeted(port)
    stop = asyncio.create_task(relay.stop())
    assert await idle.reply() == SHUTTING_DOWN  # the drain has begun
    data = make_message("pipelined") + b".\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<x@y.z>\r\n"
    session.send_body(data)
    assert (await session.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert await session.reply() == SHUTTING_DOWN
    assert await session.closed()  # MAIL and RCPT were not answered
    await asyncio.wait_for(stop, 10)
    assert await queue_counts(relay) == {"queued": 1}


# -- deliveries in flight ----------------------------------------------------------------


@dataclass
class HeldSink(SMTPSink):
    """A smarthost that answers DATA only when `release` is set."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrived.set()
        await self.release.wait()
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
async def held_sink() -> AsyncIterator[HeldSink]:
    sink = HeldSink()
    await sink.start()
    yield sink
    sink.release.set()
    await sink.stop()


async def _relay_with_one_attempt_in_flight(
    make_relay: RelayFactory, sink: HeldSink, grace: str
) -> Relay:
    relay = await make_relay(
        server={"shutdown_grace": grace}, upstream=[smtp_upstream(sink.port, timeout="60s")]
    )
    (port,) = relay.smtp_ports()
    session = await greeted(port)
    await session.start_message("held")
    session.send_body(make_message("held"))
    assert (await session.end_message()).startswith("250")
    assert (await session.command("QUIT")).startswith("221")
    await asyncio.wait_for(sink.arrived.wait(), 10)
    return relay


async def test_a_delivery_in_flight_finishes_within_the_grace(
    make_relay: RelayFactory, held_sink: HeldSink
) -> None:
    relay = await _relay_with_one_attempt_in_flight(make_relay, held_sink, "20s")
    idle = await greeted(relay.smtp_ports()[0])
    stop = asyncio.create_task(relay.stop())
    assert await idle.reply() == SHUTTING_DOWN  # the drain has begun; the attempt waits
    assert not stop.done()
    held_sink.release.set()
    await asyncio.wait_for(stop, 10)
    assert len(held_sink.messages) == 1
    assert await queue_counts(relay) == {"sent": 1}


async def test_a_delivery_cut_by_the_grace_gives_its_lease_back(
    make_relay: RelayFactory, held_sink: HeldSink
) -> None:
    relay = await _relay_with_one_attempt_in_flight(make_relay, held_sink, "200ms")
    await asyncio.wait_for(relay.stop(), 10)
    # Not left "sending" under this process's lease: due again for whoever runs next.
    assert await queue_counts(relay) == {"queued": 1}


def test_shutdown_grace_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shutdown_grace"):
        parse({"server": {"shutdown_grace": "2h"}}, tmp_path / "config.toml")
    with pytest.raises(ConfigError, match="shutdown_grace"):
        parse({"server": {"shutdown_grace": "soon"}}, tmp_path / "config.toml")
    assert parse({}, tmp_path / "config.toml").server.shutdown_grace == 30.0


# -- a rolling restart under load --------------------------------------------------------

CLIENTS = 6
MESSAGES_PER_SESSION = 3
ACKS_BEFORE_STOP = 60
ACKS_AFTER_RESTART = 60


@dataclass
class Load:
    """Clients that send continuously and keep score of what the relay told them."""

    port: int
    acked: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    shutdown_replies: int = 0
    refused: int = 0
    reset_before_greeting: int = 0
    done: bool = False
    successor: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    numbers: itertools.count[int] = field(default_factory=itertools.count)

    async def wait_acked(self, count: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while len(self.acked) < count and not self.errors:
                self.progress.clear()
                await self.progress.wait()

    async def client(self) -> None:
        while not self.done and not self.errors:
            try:
                session = await Session.open(self.port)
            except ConnectionRefusedError:
                # Between the old relay's listener closing and the new one's opening.
                self.refused += 1
                await self.successor.wait()
                continue
            try:
                await self.session(session)
            finally:
                session.close()

    async def session(self, session: Session) -> None:
        """One session, until the relay says 421 (allowed only outside a transaction)."""
        step = "greeting"
        try:
            try:
                greeting = await session.reply()
            except ConnectionResetError:
                # Linux resets what reached a listener's accept queue in the instant it
                # closed (unless net.ipv4.tcp_migrate_req = 1 hands it to another socket
                # of the port): no greeting, so to the client a refused connect, retried.
                self.reset_before_greeting += 1
                return
            if await self._shut_down(greeting, step, "220"):
                return
            step = "EHLO"
            if await self._shut_down(await session.command("EHLO load.test"), step, "250"):
                return
            for _ in range(MESSAGES_PER_SESSION):
                if self.done:
                    break
                token = f"token-{next(self.numbers):05d}"
                step = f"MAIL of {token}"
                if await self._shut_down(
                    await session.command("MAIL FROM:<app@example.com>"), step, "250"
                ):
                    return
                # From here to the reply to the content, only success is acceptable.
                step = f"RCPT of {token}"
                self._expect(await session.command("RCPT TO:<rcpt@example.org>"), step, "250")
                step = f"DATA of {token}"
                self._expect(await session.command("DATA"), step, "354")
                step = f"content of {token}"
                session.send_body(make_message(token, body="A rolling restart.\r\n" * 20))
                self._expect(await session.end_message(), step, "250")
                self.acked.add(token)
                self.progress.set()
            step = "QUIT"
            reply = await session.command("QUIT")
            if not reply.startswith(("221", "421")):
                self.errors.append(f"QUIT: {reply}")
        except (Closed, ConnectionError) as exc:
            self.errors.append(f"{step}: {exc!r}")
        except AssertionError as exc:
            self.errors.append(str(exc))
        finally:
            self.progress.set()

    async def _shut_down(self, reply: str, step: str, expected: str) -> bool:
        """True for the relay's 421 4.3.2 (then it must close); else the reply must be
        `expected`."""
        if reply == SHUTTING_DOWN:
            self.shutdown_replies += 1
            return True
        self._expect(reply, step, expected)
        return False

    @staticmethod
    def _expect(reply: str, step: str, expected: str) -> None:
        if not reply.startswith(expected):
            raise AssertionError(f"{step}: {reply!r}")


def delivered(outbox_dir: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    new = outbox_dir / "new"
    for path in new.iterdir() if new.exists() else ():
        subject = email.message_from_bytes(path.read_bytes())["Subject"]
        counts[str(subject)] += 1
    return counts


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
async def test_rolling_restart_under_load_loses_nothing_and_fails_no_transaction(
    tmp_path: Path, workers: int
) -> None:
    """With workers, the supervisor forwards SIGTERM and each worker drains its sessions."""
    port = free_port()
    outbox_dir = tmp_path / "outbox"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
hostname = "relay.test"
queue = "{tmp_path / "queue"}"
min_free_disk = 0
workers = {workers}
shutdown_grace = "20s"
[[smtp.listen]]
address = "127.0.0.1:{port}"
tls = "none"
[retry]
schedule = ["1s"]
bounces = false
[[upstream]]
name = "outbox"
type = "maildir"
path = "{outbox_dir}"
[web]
listen = "127.0.0.1:0"
""")
    old, new = RelayProcess(config), RelayProcess(config)
    load = Load(port)
    clients: list[asyncio.Task[None]] = []
    try:
        await old.start()
        clients = [asyncio.create_task(load.client()) for _ in range(CLIENTS)]
        await load.wait_acked(ACKS_BEFORE_STOP)
        assert old.proc is not None
        old.proc.send_signal(signal.SIGTERM)
        await old.wait_line("SMTP listeners closed")
        await new.start()  # binds the port the old one let go of, on the same queue
        load.successor.set()
        assert await asyncio.wait_for(old.proc.wait(), 30) == 0
        acked_by_old = len(load.acked)
        await load.wait_acked(acked_by_old + ACKS_AFTER_RESTART)
    finally:
        load.done = True
        load.successor.set()
        await asyncio.gather(*clients)
        await old.stop()

    try:
        # Cross-process: nothing to await but the files; bounded polling.
        async with asyncio.timeout(30):
            while not load.acked <= set(delivered(outbox_dir)):
                await asyncio.sleep(0.05)
    finally:
        await new.stop()
    counts = delivered(outbox_dir)
    lost = load.acked - set(counts)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    print(
        f"\nrolling restart, {workers} worker(s): {len(load.acked)} acknowledged"
        f" ({acked_by_old} before the old relay exited), {load.shutdown_replies} sessions"
        f" told 421 4.3.2, {load.refused} connects refused between the two,"
        f" {load.reset_before_greeting} reset before the greeting,"
        f" {len(lost)} lost, {duplicates} duplicate(s)",
        file=sys.stderr,
    )
    assert not load.errors, load.errors
    assert not lost
    assert load.shutdown_replies >= 1  # the old relay's sessions were ended by it
    assert not any("Traceback" in line for line in old.log + new.log)
