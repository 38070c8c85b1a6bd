"""Fixtures shared by the whole suite: a relay running in-process on loopback, an SMTP
sink that plays a smarthost, TLS material from a test CA, and a user with a password."""

from __future__ import annotations

import asyncio
import email
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP as SinkSMTP

from relay.app import Relay
from relay.config import Config, parse
from relay.queue.sqlite.engine import SQLiteQueue
from relay.queue.sqlite.store import Spool
from relay.smtp.auth import hash_password
from tests.fakes.providers import FAKE_KEY, FakeMailgun, FakeProvider

# The moto server fixtures (`moto`, `moto_session`) for every test that needs AWS.
pytest_plugins = ("tests.fakes.moto_server", "tests.fakes.postgres")

USER, PASSWORD = "scanner", "s3cret-pass"


@pytest.fixture(scope="session")
def password_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    cert = ca.issue_cert("localhost", "127.0.0.1", "relay.test")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "chain.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    return str(d / "chain.pem"), str(d / "key.pem")


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def relay_config(
    tmp_path: Path,
    *,
    tls_files: tuple[str, str] | None = None,
    password_hash: str | None = None,
    **sections: Any,
) -> Config:
    """A config like the shipped one, on port 0 everywhere, rooted in tmp_path."""
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test", "queue": str(tmp_path / "queue"), "min_free_disk": 0},
        "smtp": {"listen": [{"address": "127.0.0.1:0", "tls": "starttls"}]},
        "retry": {"schedule": ["30s"], "max_age": "1h", "bounces": False},
        "upstream": [{"name": "outbox", "type": "maildir", "path": str(tmp_path / "outbox")}],
        "web": {"listen": "127.0.0.1:0"},
    }
    if tls_files is not None:
        data["smtp"]["tls_cert"], data["smtp"]["tls_key"] = tls_files
    if password_hash is not None:
        data["smtp"]["users"] = [
            {"name": USER, "password_hash": password_hash, "allowed_senders": ["*@example.com"]}
        ]
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return parse(data, tmp_path / "config.toml")


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def make_relay(
    tmp_path: Path, tls_files: tuple[str, str], password_hash: str
) -> AsyncIterator[RelayFactory]:
    started: list[Relay] = []

    async def factory(**sections: Any) -> Relay:
        cfg = relay_config(tmp_path, tls_files=tls_files, password_hash=password_hash, **sections)
        relay = Relay(cfg)
        await relay.start()
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        await relay.stop()


@pytest.fixture
async def relay(make_relay: RelayFactory) -> Relay:
    return await make_relay()


def outbox(relay: Relay, name: str = "outbox") -> list[bytes]:
    """Messages the maildir upstream wrote, oldest first."""
    path = (
        relay.config.resolve(
            next(u for u in relay.config.upstream if u.name == name).options["path"]
        )
        / "new"
    )
    if not path.exists():
        return []
    return [p.read_bytes() for p in sorted(path.iterdir(), key=lambda p: p.stat().st_mtime_ns)]


def sqlite_spool(relay: Relay) -> Spool:
    """The SQLite shard a relay writes to, for tests that inject storage faults."""
    assert isinstance(relay.queue, SQLiteQueue)
    return relay.queue.spool


async def states(relay: Relay) -> dict[str, int]:
    return await relay.queue.counts()


async def wait_states(relay: Relay, timeout: float = 30.0, **expected: int) -> None:
    """Wait (by delivery events, not sleeps) until the queue has these counts per state."""

    async def check() -> bool:
        counts = await states(relay)
        return all(counts.get(k, 0) == v for k, v in expected.items())

    try:
        await relay.wait_for(check, timeout)
    except TimeoutError:
        raise AssertionError(f"queue never reached {expected}: {await states(relay)}") from None


def strip_received(data: bytes) -> bytes:
    """The message as the client sent it: without the relay's Received header."""
    assert data.startswith(b"Received: "), data[:80]
    end = data.index(b"\r\n")
    while data[end + 2 : end + 3] in (b" ", b"\t"):  # folded continuation lines
        end = data.index(b"\r\n", end + 2)
    return data[end + 2 :]


def make_message(
    subject: str = "hello",
    body: str = "Hello there.\r\n",
    sender: str = "app@example.com",
    to: str = "rcpt@example.org",
) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\n{body}"
    ).encode()


# -- an SMTP sink that plays a smarthost -----------------------------------------------------


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def parsed(self) -> email.message.Message:
        return email.message_from_bytes(self.data)


@dataclass
class SMTPSink:
    """Accepts mail like a smarthost; `rcpt_replies`/`data_reply` make it refuse on demand."""

    messages: list[SinkMessage] = field(default_factory=list)
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    received: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    port: int = 0

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            SinkMessage(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        self.received.set()
        return f"250 2.0.0 Ok: queued as SINK{len(self.messages)}"

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SinkSMTP(self, hostname="sink.test", enable_SMTPUTF8=True), "127.0.0.1", port
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def wait_count(self, n: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.messages) < n:
                self.received.clear()
                await self.received.wait()


@pytest.fixture
async def sink() -> AsyncIterator[SMTPSink]:
    s = SMTPSink()
    await s.start()
    yield s
    await s.stop()


def smtp_upstream(port: int, name: str = "smarthost", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "smtp", "host": "127.0.0.1", "port": port, "tls": "none", **extra}


@pytest.fixture
async def mailgun() -> AsyncIterator[FakeMailgun]:
    """A fake Mailgun that checks each request as the real API does (fails on demand)."""
    fake = FakeMailgun(domain="mg.example.com")
    await fake.start()
    yield fake
    await fake.stop()


def mailgun_upstream(fake: FakeProvider, **extra: Any) -> dict[str, Any]:
    """An [[upstream]] entry for a fake Mailgun (priority 1, a 5 s timeout)."""
    return {
        "name": "mailgun",
        "type": "mailgun",
        "api_key": FAKE_KEY,
        "base_url": fake.url,
        "domain": "mg.example.com",
        "priority": 1,
        "timeout": "5s",
        **extra,
    }
