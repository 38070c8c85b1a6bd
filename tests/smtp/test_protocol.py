"""Protocol strictness and log hygiene (issue 10, items E-Q and day-one 5-6): envelope
syntax by RFC 5321/6531, AUTH by RFC 4954/4616, replies that never echo raw bytes or
exception text, and logs that name the client in one line, never a credential or a
traceback."""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
import ssl
import warnings
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import PASSWORD, USER, RelayFactory, make_message, outbox, wait_states
from tests.smtp.test_bad_input import RawSession, assert_queue_empty, plain

CLEARTEXT = {"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False}


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@pytest.fixture
async def cleartext(make_relay: RelayFactory) -> Relay:
    return await make_relay(smtp={"listen": [CLEARTEXT]})


@pytest.fixture
async def session(cleartext: Relay) -> AsyncIterator[RawSession]:
    s = await RawSession.open(cleartext.smtp_ports()[0])
    assert (await s.cmd("EHLO client.test")).startswith("250")
    yield s
    await s.close()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


# -- E, F, M, P: envelope addresses ----------------------------------------------------


@pytest.mark.parametrize("command", ["MAIL FROM:", "RCPT TO:"])
async def test_unclosed_angle_bracket_is_a_syntax_error(session: RawSession, command: str) -> None:
    if command.startswith("RCPT"):
        await session.cmd("MAIL FROM:<app@example.com>")
    reply = await session.cmd(f"{command}<x@example.com")
    assert reply.startswith("501 5.5.4 Syntax:"), reply


@pytest.mark.parametrize(
    "address", ["<user@[1.2.3.4>", "<user@[>", "<user@[IPv6:::1>", "<a@b>junk", "<\udcff@x>"]
)
@pytest.mark.parametrize("command", ["MAIL FROM:", "RCPT TO:"])
async def test_malformed_paths_get_a_fixed_reply_without_exception_text(
    session: RawSession, command: str, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    if command.startswith("RCPT"):
        await session.cmd("MAIL FROM:<app@example.com>")
    reply = await session.cmd(
        (command + address).encode("utf-8", "surrogateescape") + b" SMTPUTF8\r\n"
        if command.startswith("MAIL")
        else (command + address).encode("utf-8", "surrogateescape") + b"\r\n"
    )
    assert reply[:3] in ("501", "553"), reply
    assert "Error: (" not in reply and "Exception" not in reply
    no_tracebacks(caplog)


async def test_utf8_addresses_need_smtputf8(session: RawSession, cleartext: Relay) -> None:
    reply = await session.cmd("MAIL FROM:<jörg@example.com>")
    assert reply.startswith("553 5.6.7"), reply
    assert (await session.cmd("MAIL FROM:<app@example.com>")).startswith("250")
    reply = await session.cmd("RCPT TO:<jörg@exämple.org>")
    assert reply.startswith("553 5.6.7"), reply
    await session.cmd("RSET")
    assert (await session.cmd("MAIL FROM:<jörg@example.com> SMTPUTF8")).startswith("250")
    assert (await session.cmd("RCPT TO:<jörg@exämple.org>")).startswith("250")
    assert (await session.cmd("DATA")).startswith("354")
    assert (await session.cmd(make_message() + b".\r\n")).startswith("250 2.0.0")
    [row] = await cleartext.queue.search()
    assert row.meta.get("smtputf8") or row.mail_from == "jörg@example.com"


async def test_quoted_local_part_with_a_space_is_accepted(
    session: RawSession, cleartext: Relay
) -> None:
    assert (await session.cmd('MAIL FROM:<"john doe"@example.com>')).startswith("250")
    assert (await session.cmd('RCPT TO:<"jane q"@example.org>')).startswith("250")
    await session.cmd("DATA")
    assert (await session.cmd(make_message() + b".\r\n")).startswith("250 2.0.0")
    [row] = await cleartext.queue.search()
    assert row.mail_from == '"john doe"@example.com'


# -- G, I, K: AUTH ---------------------------------------------------------------------


async def test_auth_plain_as_another_identity_is_refused(session: RawSession) -> None:
    blob = b64(f"bob\0{USER}\0{PASSWORD}".encode())
    assert (await session.cmd(f"AUTH PLAIN {blob}")).startswith("535 5.7.8")
    # Its own identity as authzid is the same identity: accepted.
    blob = b64(f"{USER}\0{USER}\0{PASSWORD}".encode())
    assert (await session.cmd(f"AUTH PLAIN {blob}")).startswith("235 2.7.0")


async def test_auth_after_helo_is_accepted_and_credentials_never_logged(
    cleartext: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    s = await RawSession.open(cleartext.smtp_ports()[0])
    assert (await s.cmd("HELO scanner")).startswith("250")
    assert await s.cmd("AUTH LOGIN") == "334 " + b64("Username:")
    assert await s.cmd(b64(USER)) == "334 " + b64("Password:")
    assert (await s.cmd(b64(PASSWORD))).startswith("235 2.7.0")
    assert (await s.cmd("MAIL FROM:<scanner@example.com>")).startswith("250")
    await s.close()
    assert b64(USER) not in caplog.text and b64(PASSWORD) not in caplog.text


async def test_refused_auth_does_not_log_what_follows(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay(smtp={"listen": [{**CLEARTEXT, "auth": "none"}]})
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("HELO scanner")
    assert (await s.cmd("AUTH LOGIN")).startswith("502 5.5.1")
    assert (await s.cmd(b64(USER))).startswith("500 5.5.2")
    assert (await s.cmd(b64(PASSWORD))).startswith("500 5.5.2")
    await s.close()
    assert b64(USER) not in caplog.text and b64(PASSWORD) not in caplog.text


async def test_null_sender_needs_to_be_allowed_for_a_user(
    make_relay: RelayFactory, password_hash: str
) -> None:
    users = [
        {"name": USER, "password_hash": password_hash, "allowed_senders": ["*@example.com"]},
        {"name": "bouncer", "password_hash": password_hash, "allowed_senders": ["<>"]},
    ]
    relay = await make_relay(smtp={"listen": [{**CLEARTEXT, "auth": "required"}], "users": users})
    for name, expected in ((USER, "553 5.7.1"), ("bouncer", "250 2.1.0")):
        s = await RawSession.open(relay.smtp_ports()[0])
        await s.cmd("EHLO client.test")
        assert (await s.cmd(f"AUTH PLAIN {plain(name, PASSWORD)}")).startswith("235")
        reply = await s.cmd("MAIL FROM:<>")
        assert reply.startswith(expected), (name, reply)
        await s.close()


async def test_long_auth_answer_gets_a_fixed_reply(session: RawSession) -> None:
    assert (await session.cmd("AUTH LOGIN")).startswith("334")
    reply = await session.cmd("A" * 4000)
    assert reply == "500 5.5.6 Authentication exchange line is too long", reply
    assert (await session.cmd("AUTH PLAIN")).startswith("334")
    reply = await session.cmd("A" * 4000)
    assert reply == "500 5.5.6 Authentication exchange line is too long", reply
    assert (await session.cmd("NOOP")).startswith("250")


# -- J, N: TLS -------------------------------------------------------------------------


def _tls10_starttls(port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0: that is the point
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("scanner")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, OSError)):
            client.starttls(context=ctx)


async def test_failed_starttls_handshake_is_one_warning_line(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:

    await asyncio.to_thread(_tls10_starttls, relay.smtp_ports()[0])
    # A fresh session proves the server has finished with the failed one.
    probe = await RawSession.open(relay.smtp_ports()[0])
    await probe.cmd("QUIT")
    lines = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert lines[0].levelno == logging.WARNING and "127.0.0.1" in lines[0].getMessage()
    no_tracebacks(caplog)


async def test_second_starttls_is_refused(relay: Relay, client_tls: ssl.SSLContext) -> None:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_ports()[0], tls_context=client_tls
    )
    await client.connect(start_tls=False)
    await client.starttls()
    response = await client.execute_command(b"STARTTLS")
    assert (response.code, response.message[:5]) == (503, "5.5.1")
    assert (await client.noop()).code == 250
    await client.quit()


# -- O: replies ------------------------------------------------------------------------


async def test_replies_never_carry_raw_client_bytes(session: RawSession) -> None:
    for line in (
        b"NOOP\rRSET\r\n",
        b"MAIL FROM:<a\x00b@example.com>\r\n",
        b"MAIL FROM:<\xff\xfe@example.com>\r\n",
        b"RCPT TO:<x\r@example.com>\r\n",
        b"\x00\x01\x02\r\n",
    ):
        session.writer.write(line)
        raw = await session.reader.readuntil(b"\r\n")
        body = raw[:-2]
        assert body[:3].isdigit() and body[3:4] in (b" ", b"-"), raw
        assert all(0x20 <= c < 0x7F for c in body), raw


# -- 5, 6: logging ---------------------------------------------------------------------


async def test_refusals_are_logged_with_client_user_envelope_and_reply(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    relay = await make_relay(smtp={"listen": [CLEARTEXT], "trusted_networks": ["10.9.0.0/16"]})
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")  # relay denied
    await s.cmd(f"AUTH PLAIN {plain(USER, 'wrong')}")
    await s.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}")
    await s.cmd("MAIL FROM:<boss@other.example>")  # sender not allowed
    await s.close()
    rejects = [r.getMessage() for r in caplog.records if "NOQUEUE: reject" in r.getMessage()]
    assert any(
        "MAIL from [127.0.0.1]" in m and "from=<app@example.com>" in m and "554 5.7.1" in m
        for m in rejects
    ), rejects
    assert any(f"user={USER}" in m and "535 5.7.8" in m for m in rejects), rejects
    assert any(
        f"user={USER}" in m and "from=<boss@other.example>" in m and "553 5.7.1" in m
        for m in rejects
    ), rejects
    assert "wrong" not in caplog.text


def test_refusal_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    from relay.smtp.refusals import RefusalLog

    caplog.set_level(logging.INFO, logger="relay.smtp")
    now = [0.0]
    refusals = RefusalLog(rate=10, burst=20, clock=lambda: now[0])
    for _ in range(1000):
        refusals.refused(command="RCPT", peer="[192.0.2.1]:1", reply="550 no")
    assert len(caplog.records) == 20
    now[0] = 1.0  # a second later: ten more lines, the first says how many were dropped
    for _ in range(1000):
        refusals.refused(command="RCPT", peer="[192.0.2.1]:1", reply="550 no")
    assert len(caplog.records) == 31
    assert "980 refusal line(s) not logged" in caplog.records[20].getMessage()


async def test_authenticated_mail_logs_no_deprecation_and_implicit_tls_no_warning(
    make_relay: RelayFactory, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relay = await make_relay(
            smtp={"listen": [{"address": "127.0.0.1:0", "tls": "implicit", "auth": "required"}]}
        )
        await aiosmtplib.send(
            make_message(),
            sender="app@example.com",
            recipients=["rcpt@example.org"],
            hostname="127.0.0.1",
            port=relay.smtp_ports()[0],
            use_tls=True,
            tls_context=client_tls,
            username=USER,
            password=PASSWORD,
        )
        await wait_states(relay, sent=1)
    assert len(outbox(relay)) == 1
    assert "deprecated" not in caplog.text
    assert "not requiring TLS" not in caplog.text
    assert not [w for w in caught if "TLS" in str(w.message)]


async def test_cleartext_auth_listener_is_warned_about_once_at_start(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay(smtp={"listen": [{**CLEARTEXT, "auth": "required"}]})
    for _ in range(3):
        s = await RawSession.open(relay.smtp_ports()[0])
        await s.cmd("QUIT")
    warned = [r for r in caplog.records if "AUTH is accepted without TLS" in r.getMessage()]
    assert len(warned) == 1
    assert "not requiring TLS" not in caplog.text


# -- Q: network failures ---------------------------------------------------------------


async def test_client_reset_mid_data_is_one_line_and_nothing_stored(
    session: RawSession, cleartext: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    import struct

    await session.cmd("MAIL FROM:<app@example.com>")
    await session.cmd("RCPT TO:<a@example.org>")
    await session.cmd("DATA")
    session.writer.write(b"Subject: half\r\n\r\n" + b"x" * 100_000)
    await session.writer.drain()
    sock = session.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    session.writer.close()  # RST, not FIN
    probe = await RawSession.open(cleartext.smtp_ports()[0])
    await probe.cmd("QUIT")
    await assert_queue_empty(cleartext)
    no_tracebacks(caplog)


async def test_starttls_after_pipelined_plaintext_does_not_hang(relay: Relay) -> None:
    """Found by the fuzz test: plaintext pipelined past the session's buffer paused the
    socket, so the handshake never read the client's hello and the session hung until
    its timeout. The plaintext is discarded and the handshake reads the socket."""
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    s.writer.write(b"STARTTLS\r\n" + b"x" * 5000 + b"\r\n")
    assert (await s.reply()).startswith("220 Ready to start TLS")
    s.writer.write_eof()
    async with asyncio.timeout(5):
        assert await s.reader.read() == b""
    s.writer.close()
