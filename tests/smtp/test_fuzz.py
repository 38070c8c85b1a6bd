"""A bounded SMTP fuzz run (issue 10): seeded, a few thousand generated sessions of
mutated commands, addresses, AUTH exchanges and DATA, pipelined at the real listener.
Every reply line is well formed (three digits, a space or hyphen, printable ASCII, CRLF)
and carries no exception text; nothing is logged at ERROR or with a traceback; and the
relay still accepts a valid control message after each batch."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import RelayFactory, make_message, outbox

SEED = 20261130
SESSIONS = 3000
BATCH = 50  # concurrent sessions, under the per-address connection limit
REPLY_LINE = re.compile(rb"[2-5][0-9]{2}[ -][\x20-\x7e]*\r\n")
LEAKS = (b"Error: (", b"Traceback", b"Exception", b"object has no attribute", b"errno")

ADDRESSES = [
    "<app@example.com>",
    "<>",
    '<"john doe"@example.com>',
    "<user@[1.2.3.4>",
    "<user@[>",
    "<user@[IPv6:::1>",
    "<user@[IPv6:::1]>",
    "<user@[300.1.1.1]>",
    "<a@b@c>",
    "<jörg@exämple.com>",
    "<@a,@b:c@example.org>",
    "<x@example.com",
    "x@example.com",
    "<postmaster>",
    "<" + "l" * 70 + "@example.com>",
    "<a@" + "d" * 300 + ".com>",
    '<"unterminated@example.com>',
    "<a\\@b@example.com>",
    "<rcpt@example.org>",
]
PARAMS = ["", " SIZE=1000", " SIZE=x", " BODY=8BITMIME", " BODY=9BIT", " SMTPUTF8", " FOO=", " =x"]
VERBS = ["EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "VRFY", "HELP"]
VERBS += ["EXPN", "AUTH", "STARTTLS", "BDAT 10", "ehlo", "Mail From:", "", "\x00", "QUIT now"]
NOISE = [b"\r", b"\n", b"\x00", b"\xff", b"\xc3(", b"\xed\xa0\x80", b" ", b"<", b">", b"\t"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auth_lines(rng: random.Random) -> list[bytes]:
    blobs = [b"\0scanner\0wrong", b"bob\0alice\0pw", b"x" * 3000, b"\xff\xfe", b"", b"\0\0"]
    mechanism = rng.choice(["PLAIN", "LOGIN", "plain", "CRAM-MD5", "LOGIN x y", "PLAIN !!"])
    lines = [f"AUTH {mechanism}".encode()]
    if rng.random() < 0.5:
        lines[0] += b" " + b64(rng.choice(blobs)).encode()
    for _ in range(rng.randrange(0, 3)):
        lines.append(
            rng.choice([b64(rng.choice(blobs)).encode(), b"*", b"!!notbase64", b"A" * 4000])
        )
    return lines


def data_lines(rng: random.Random) -> list[bytes]:
    body = [b"Subject: fuzz", b""]
    for _ in range(rng.randrange(0, 6)):
        body.append(
            rng.choice([b"text", b".", b"..dot", b"line\rcr", b"line\nlf", b"\n.\r", b"x" * 1200])
        )
    if rng.random() < 0.8:
        body.append(b".")
    return [b"DATA", *body]


def mutate(rng: random.Random, line: bytes) -> bytes:
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        at = rng.randrange(len(line) + 1)
        line = line[:at] + rng.choice(NOISE) + line[at:]
    if rng.random() < 0.02:
        line += b"L" * rng.choice([600, 1100, 5000])
    return line


def command(rng: random.Random) -> list[bytes]:
    verb = rng.choice(VERBS)
    if verb in ("MAIL FROM:", "RCPT TO:", "Mail From:"):
        arg = rng.choice(ADDRESSES) + rng.choice(PARAMS)
        return [mutate(rng, (verb + arg).encode("utf-8", "surrogateescape"))]
    if verb == "AUTH":
        return auth_lines(rng)
    if verb == "DATA":
        return data_lines(rng)
    if verb in ("EHLO", "HELO", "ehlo"):
        return [
            mutate(
                rng, f"{verb} {rng.choice(['client.test', '', 'x' * 300, '[1.2.3.4]'])}".encode()
            )
        ]
    return [mutate(rng, verb.encode())]


def session_bytes(rng: random.Random) -> bytes:
    lines: list[bytes] = [b"EHLO fuzz.test"] if rng.random() < 0.7 else []
    for _ in range(rng.randrange(1, 10)):
        lines += command(rng)
    ending = rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n"])
    # Whatever state the session is left in (DATA, an AUTH challenge), this ends it.
    return ending.join(lines) + b"\r\n\r\n.\r\nQUIT\r\n"


def check_replies(raw: bytes) -> None:
    lines = raw.splitlines(keepends=True)
    for line in lines:
        assert REPLY_LINE.fullmatch(line), raw
        assert not any(leak in line for leak in LEAKS), raw


async def run_session(port: int, payload: bytes) -> None:
    """Send the whole session at once (pipelined) and read every reply to the close.

    Once the server has said `220 Ready to start TLS` the client could only speak TLS:
    it shuts its side, the server's handshake fails and it closes, logging one line.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = b""
    try:
        async with asyncio.timeout(10):
            writer.write(payload)
            while chunk := await reader.read(65536):
                raw += chunk
                if b"220 Ready to start TLS" in raw and writer.can_write_eof():
                    writer.write_eof()
    except ConnectionError:
        pass  # the server closed while we still wrote (after 421): a clean refusal
    finally:
        writer.close()
    check_replies(raw)


async def send_control(relay: Relay, n: int) -> None:
    await aiosmtplib.send(
        make_message(subject=f"control {n}"),
        sender="app@example.com",
        recipients=["control@example.org"],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )


async def test_fuzzed_sessions_get_well_formed_replies_and_the_relay_stays_up(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = await make_relay(
        smtp={
            "listen": [{"address": "127.0.0.1:0", "tls": "starttls", "auth_require_tls": False}],
            "max_message_size": "20KB",
        }
    )
    port = relay.smtp_ports()[0]
    rng = random.Random(SEED)
    payloads = [session_bytes(rng) for _ in range(SESSIONS)]
    for batch, start in enumerate(range(0, SESSIONS, BATCH * 10)):
        chunk = payloads[start : start + BATCH * 10]
        for i in range(0, len(chunk), BATCH):
            await asyncio.gather(*(run_session(port, p) for p in chunk[i : i + BATCH]))
        await send_control(relay, batch)
    controls = SESSIONS // (BATCH * 10)

    async def all_controls_delivered() -> bool:
        return sum(b"Subject: control " in m for m in outbox(relay)) == controls

    await relay.wait_for(all_controls_delivered)
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad[:5]]
    assert "Traceback" not in caplog.text
