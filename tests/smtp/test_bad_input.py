"""Every bad input gets the right SMTP code, an enhanced status code, a reason a person can
act on, and leaves nothing in the queue."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest

from relay.app import Relay
from tests.conftest import (
    PASSWORD,
    USER,
    RelayFactory,
    make_message,
    outbox,
    sqlite_spool,
    states,
    strip_received,
    wait_states,
)


class RawSession:
    """A hand-driven SMTP session, for what polite client libraries refuse to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        assert (await session.reply()).startswith("220")
        return session

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await self.reader.readline()).decode()
            assert line, "server closed the connection"
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def cmd(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def smtp(relay: Relay) -> AsyncIterator[RawSession]:
    session = await RawSession.open(relay.smtp_ports()[0])
    assert (await session.cmd("EHLO client.test")).startswith("250")
    yield session
    await session.close()


async def assert_queue_empty(relay: Relay) -> None:
    assert await states(relay) == {}
    assert (
        await sqlite_spool(relay).read(
            lambda c: c.execute("SELECT COUNT(*) FROM bodies").fetchone()[0]
        )
        == 0
    )


async def test_unknown_command_is_neither_echoed_nor_logged(
    smtp: RawSession, caplog: pytest.LogCaptureFixture
) -> None:
    assert await smtp.cmd("FROB x") == "500 5.5.2 Command not recognized"
    assert "FROB" not in caplog.text


@pytest.mark.parametrize("address", ["<not an address>", "<a@b@c>", "<@>"])
async def test_malformed_sender(smtp: RawSession, address: str) -> None:
    reply = await smtp.cmd(f"MAIL FROM:{address}")
    assert reply[:3] in ("553", "501"), reply
    assert reply[4:5] == "5", reply


async def test_recipient_without_domain(smtp: RawSession) -> None:
    await smtp.cmd("MAIL FROM:<app@example.com>")
    assert (await smtp.cmd("RCPT TO:<postmaster>")).startswith("553 5.1.3")


async def test_too_many_recipients(make_relay: RelayFactory) -> None:
    relay = await make_relay(smtp={"max_recipients": 2})
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")
    assert (await s.cmd("RCPT TO:<a@example.org>")).startswith("250 2.1.5")
    assert (await s.cmd("RCPT TO:<b@example.org>")).startswith("250 2.1.5")
    reply = await s.cmd("RCPT TO:<c@example.org>")
    assert reply.startswith("452 4.5.3 Too many recipients (at most 2"), reply
    await s.close()


async def test_oversize_declared_and_actual(make_relay: RelayFactory) -> None:
    relay = await make_relay(smtp={"max_message_size": 2000})
    s = await RawSession.open(relay.smtp_ports()[0])
    assert "250-SIZE 2000" in await s.cmd("EHLO client.test")
    assert (await s.cmd("MAIL FROM:<app@example.com> SIZE=5000")).startswith("552 5.3.4")
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    assert (await s.cmd("DATA")).startswith("354")
    big = make_message(body="x" * 70 + "\r\n") * 40
    reply = await s.cmd(big + b".\r\n")
    assert reply.startswith("552 5.3.4 Message too big: at most 2000 bytes"), reply
    # The session stays usable and in sync after the refusal.
    assert (await s.cmd("NOOP")).startswith("250")
    await s.close()
    await assert_queue_empty(relay)


async def test_wrong_credentials_then_disconnect(relay: Relay) -> None:
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    # On the STARTTLS listener AUTH needs TLS first.
    assert (await s.cmd("AUTH PLAIN " + base64.b64encode(b"\0x\0y").decode())).startswith(
        "538 5.7.11"
    )
    await s.close()


@pytest.fixture
async def cleartext_auth(make_relay: RelayFactory) -> Relay:
    return await make_relay(
        smtp={
            "listen": [{"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False}],
            "max_auth_failures": 3,
        }
    )


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_repeated_auth_failures_close_the_session(cleartext_auth: Relay) -> None:
    s = await RawSession.open(cleartext_auth.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    for _ in range(2):
        assert (await s.cmd(f"AUTH PLAIN {plain(USER, 'wrong')}")).startswith("535 5.7.8")
    reply = await s.cmd(f"AUTH PLAIN {plain(USER, 'wrong')}")
    assert reply.startswith("535 5.7.8"), reply
    assert (await s.reply()).startswith("421 4.7.0 Too many failed authentication")
    assert await s.reader.read() == b""
    await s.close()


async def test_auth_login_prompts_and_inline_user(cleartext_auth: Relay) -> None:
    s = await RawSession.open(cleartext_auth.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    b64 = base64.b64encode
    # The prompts picky scanners wait for: "Username:" and "Password:".
    assert await s.cmd("AUTH LOGIN") == "334 " + b64(b"Username:").decode()
    assert await s.cmd(b64(USER.encode()).decode()) == "334 " + b64(b"Password:").decode()
    assert (await s.cmd(b64(PASSWORD.encode()).decode())).startswith("235 2.7.0")
    await s.close()
    s = await RawSession.open(cleartext_auth.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    assert (
        await s.cmd(f"AUTH LOGIN {b64(USER.encode()).decode()}")
        == "334 " + b64(b"Password:").decode()
    )
    assert (await s.cmd(b64(PASSWORD.encode()).decode())).startswith("235 2.7.0")
    await s.close()


async def test_untrusted_client_without_auth_is_not_relayed(make_relay: RelayFactory) -> None:
    relay = await make_relay(
        smtp={
            "trusted_networks": ["10.9.8.0/24"],
            "listen": [{"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False}],
        }
    )
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    reply = await s.cmd("MAIL FROM:<app@example.com>")
    assert reply.startswith("554 5.7.1 Relay access denied: 127.0.0.1 is not in a trusted"), reply
    # After AUTH the same client may relay, but only from its allowed senders.
    assert (await s.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}")).startswith("235")
    reply = await s.cmd("MAIL FROM:<boss@other.example>")
    assert reply.startswith(
        f"553 5.7.1 Sender address <boss@other.example> is not allowed for user {USER}"
    ), reply
    assert (await s.cmd("MAIL FROM:<scanner@example.com>")).startswith("250 2.1.0")
    await s.close()
    await assert_queue_empty(relay)


async def test_auth_required_listener_refuses_trusted_clients_without_auth(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(
        smtp={
            "listen": [
                {
                    "address": "127.0.0.1:0",
                    "tls": "none",
                    "auth": "required",
                    "auth_require_tls": False,
                }
            ]
        }
    )
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    assert (await s.cmd("MAIL FROM:<app@example.com>")).startswith("530 5.7.0")
    await s.close()


async def test_auth_none_listener_does_not_offer_auth(make_relay: RelayFactory) -> None:
    relay = await make_relay(
        smtp={
            "listen": [
                {"address": "127.0.0.1:0", "tls": "none", "auth": "none", "auth_require_tls": False}
            ]
        }
    )
    s = await RawSession.open(relay.smtp_ports()[0])
    assert "AUTH" not in await s.cmd("EHLO client.test")
    assert (await s.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}")).startswith("5")
    await s.close()


async def test_disconnect_mid_data_leaves_nothing(smtp: RawSession, relay: Relay) -> None:
    await smtp.cmd("MAIL FROM:<app@example.com>")
    await smtp.cmd("RCPT TO:<a@example.org>")
    assert (await smtp.cmd("DATA")).startswith("354")
    smtp.writer.write(make_message() + b"more text but no end marker")
    await smtp.writer.drain()
    smtp.writer.close()
    await smtp.writer.wait_closed()
    # A fresh session proves the server finished with the old one; nothing was queued.
    probe = await RawSession.open(relay.smtp_ports()[0])
    await probe.cmd("QUIT")
    await assert_queue_empty(relay)


SMUGGLING = {
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.LF": b"\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CR": b"\r.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
}
SECOND = (
    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsend money\r\n"
)


def bare_lf_listener(mode: str) -> dict[str, object]:
    """A listener in `mode` where loopback (a trusted network) is not exempt."""
    return {
        "listen": [{"address": "127.0.0.1:0", "tls": "none", "bare_lf": mode, "bare_lf_exempt": []}]
    }


@pytest.mark.parametrize("mode", ["reject", "normalize"])
@pytest.mark.parametrize("smuggled", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_smuggling_markers_never_end_a_message(
    make_relay: RelayFactory, mode: str, smuggled: bytes
) -> None:
    """Only <CR><LF>.<CR><LF> ends DATA, whatever the bare-LF mode: a bare CR is always
    refused; a bare LF is refused ("reject") or becomes CRLF inside the one message
    ("normalize"). Never two messages, and the session stays in sync."""
    relay = await make_relay(smtp=bare_lf_listener(mode))
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    assert (await s.cmd("DATA")).startswith("354")
    reply = await s.cmd(make_message() + smuggled + SECOND + b".\r\n")
    assert (await s.cmd("NOOP")).startswith("250")
    await s.close()
    if mode == "reject" or b"\r" in smuggled.replace(b"\r\n", b""):
        assert reply.startswith("550 5.6.11 Message rejected: it contains a bare CR"), reply
        await assert_queue_empty(relay)
        return
    assert reply.startswith("250 2.0.0"), reply
    await wait_states(relay, sent=1)
    [stored] = outbox(relay)
    assert b"send money" in stored
    assert stored.count(b"\n") == stored.count(b"\r\n") == stored.count(b"\r")


async def test_bare_lf_from_a_trusted_network_is_normalised_on_a_reject_listener(
    make_relay: RelayFactory,
) -> None:
    """A PHP mail() on 127.0.0.1 (trusted) sends LF line endings: bare_lf_exempt defaults
    to the trusted networks, so its message is accepted with CRLF line endings."""
    relay = await make_relay(
        smtp={"listen": [{"address": "127.0.0.1:0", "tls": "none", "bare_lf": "reject"}]}
    )
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    await s.cmd("DATA")
    body = b"Subject: lf\n\nline one\n..dotted\nlast\n"
    assert (await s.cmd(body + b"\r\n.\r\n")).startswith("250 2.0.0")
    await s.close()
    await wait_states(relay, sent=1)
    [stored] = outbox(relay)
    assert strip_received(stored) == b"Subject: lf\r\n\r\nline one\r\n.dotted\r\nlast\r\n\r\n"


async def test_queue_refuses_when_disk_is_nearly_full(make_relay: RelayFactory) -> None:
    relay = await make_relay(server={"min_free_disk": "1000000GB"})
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    await s.cmd("DATA")
    reply = await s.cmd(make_message() + b".\r\n")
    assert reply.startswith("452 4.3.1 Insufficient system storage"), reply
    await s.close()
    await assert_queue_empty(relay)


async def test_queue_write_error_gives_451_and_no_partial_message(relay: Relay) -> None:
    # SQLite's own "database or disk is full" path: cap the database at its current size.
    pages = await sqlite_spool(relay).write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await sqlite_spool(relay).write(
        lambda c: c.execute(f"PRAGMA max_page_count = {pages + 1}").fetchone()
    )
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    await s.cmd("DATA")
    # 12 KB: below queries.INLINE_MAX, so the body is a blob in the capped database.
    reply = await s.cmd(make_message(body=("y" * 76 + "\r\n") * 150) + b".\r\n")
    assert reply.startswith("451 4.3.0 Could not store the message"), reply
    await assert_queue_empty(relay)
    # Once storage is back, the same session goes on.
    await sqlite_spool(relay).write(
        lambda c: c.execute("PRAGMA max_page_count = 1073741823").fetchone()
    )
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    await s.cmd("DATA")
    assert (await s.cmd(make_message() + b".\r\n")).startswith("250 2.0.0 Ok: queued as")
    await s.close()
    rows = await relay.queue.search()
    assert len(rows) == 1


async def test_null_sender_is_accepted(smtp: RawSession, relay: Relay) -> None:
    assert (await smtp.cmd("MAIL FROM:<>")).startswith("250 2.1.0")
    await smtp.cmd("RCPT TO:<a@example.org>")
    await smtp.cmd("DATA")
    assert (await smtp.cmd(make_message() + b".\r\n")).startswith("250 2.0.0")
    [row] = await relay.queue.search()
    assert row.mail_from == ""


async def test_control_characters_in_helo_stay_out_of_the_received_header(
    make_relay: RelayFactory,
) -> None:
    """The body is stored with the promise that every line ends in CRLF (the smtp upstream
    then sends it unscanned); a bare CR smuggled in through HELO must not break it."""
    # An upstream nobody answers, so the stored body is still there to read (a maildir
    # took the message and dropped its body before the read, now and then).
    relay = await make_relay(
        upstream=[
            {"name": "nowhere", "type": "smtp", "host": "127.0.0.1", "port": 9, "tls": "none"}
        ]
    )
    session = await RawSession.open(relay.smtp_ports()[0])
    try:
        assert (await session.cmd(b"EHLO evil\rhost\x00name\r\n")).startswith("250")
        await session.cmd("MAIL FROM:<app@example.com>")
        await session.cmd("RCPT TO:<a@example.org>")
        await session.cmd("DATA")
        assert (await session.cmd(make_message() + b".\r\n")).startswith("250 2.0.0")
    finally:
        await session.close()
    [row] = await relay.queue.search()
    stored = await relay.queue.body(row.id)
    assert stored is not None
    assert stored.startswith(b"Received: from evil?host?name ([127.0.0.1])\r\n")
    lf = stored.count(b"\n")
    assert lf == stored.count(b"\r\n") == stored.count(b"\r")
    assert row.meta["crlf"] is True
