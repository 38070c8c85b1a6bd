"""Real SMTP clients (smtplib, aiosmtplib, swaks) over plain, STARTTLS and implicit TLS,
with AUTH PLAIN and both AUTH LOGIN forms: each message lands in the Maildir byte for byte
behind the relay's Received header, and the timeline records who sent it and how."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import (
    PASSWORD,
    USER,
    RelayFactory,
    make_message,
    outbox,
    strip_received,
    wait_states,
)

LISTENERS = {
    "listen": [
        {"address": "127.0.0.1:0", "tls": "none", "auth": "optional", "auth_require_tls": False},
        {"address": "127.0.0.1:0", "tls": "starttls", "auth": "optional"},
        {"address": "127.0.0.1:0", "tls": "implicit", "auth": "required"},
    ]
}
PLAIN, STARTTLS, IMPLICIT = 0, 1, 2


@pytest.fixture
async def relay3(make_relay: RelayFactory) -> Relay:
    return await make_relay(smtp=LISTENERS)


def _smtplib_send(port: int, mode: int, mech: str | None, data: bytes, ctx: ssl.SSLContext) -> None:
    client = (
        smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=ctx)
        if mode == IMPLICIT
        else smtplib.SMTP("127.0.0.1", port, timeout=10)
    )
    with client:
        client.ehlo("client.test")
        if mode == STARTTLS:
            client.starttls(context=ctx)
            client.ehlo("client.test")
        if mech:
            client.user, client.password = USER, PASSWORD
            # smtplib sends the LOGIN user name inline: "AUTH LOGIN <b64 user>".
            client.auth(mech, getattr(client, f"auth_{mech.lower()}"))
        client.sendmail("app@example.com", ["rcpt@example.org"], data)


async def _aiosmtplib_send(
    port: int, mode: int, mech: str | None, data: bytes, ctx: ssl.SSLContext
) -> None:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        use_tls=mode == IMPLICIT,
        start_tls=mode == STARTTLS,
        tls_context=ctx,
        local_hostname="client.test",
    )
    async with client:
        if mech and mode == IMPLICIT:
            await client.ehlo()  # aiosmtplib only greets by itself around STARTTLS
        if mech == "PLAIN":
            await client.auth_plain(USER, PASSWORD)
        elif mech == "LOGIN":
            await client.auth_login(USER, PASSWORD)
        await client.sendmail("app@example.com", ["rcpt@example.org"], data)


async def _swaks_send(port: int, mode: int, mech: str | None, data: bytes, tmp_path: Path) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by `make test` (Debian package swaks)"
    msg = tmp_path / "msg.eml"
    msg.write_bytes(data[:-2])  # swaks ends the data with its own CRLF before the dot
    args = [
        swaks,
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "client.test",
        "--from",
        "app@example.com",
        "--to",
        "rcpt@example.org",
        "--data",
        str(msg),
    ]
    if mode == STARTTLS:
        args.append("--tls")
    elif mode == IMPLICIT:
        args.append("--tlsc")
    if mech:
        # swaks answers the server's Username:/Password: prompts for LOGIN.
        args += ["--auth", mech, "--auth-user", USER, "--auth-password", PASSWORD]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert b"250 2.0.0 Ok: queued as" in out, out.decode()


CASES = [
    ("smtplib", PLAIN, None),
    ("smtplib", STARTTLS, "PLAIN"),
    ("smtplib", IMPLICIT, "LOGIN"),
    ("smtplib", PLAIN, "LOGIN"),
    ("aiosmtplib", PLAIN, None),
    ("aiosmtplib", STARTTLS, "LOGIN"),
    ("aiosmtplib", IMPLICIT, "PLAIN"),
    ("swaks", PLAIN, None),
    ("swaks", STARTTLS, "LOGIN"),
    ("swaks", IMPLICIT, "PLAIN"),
    ("swaks", STARTTLS, "PLAIN"),
]


@pytest.mark.parametrize(
    ("client", "mode", "mech"),
    CASES,
    ids=[f"{c}-{['plain', 'starttls', 'implicit'][m]}-{a or 'noauth'}" for c, m, a in CASES],
)
async def test_message_lands_in_maildir_byte_for_byte(
    relay3: Relay,
    client: str,
    mode: int,
    mech: str | None,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    data = make_message(
        subject=f"{client} {mode} {mech}",
        body="Line one.\r\n.A line that starts with a dot\r\n\r\nend\r\n",
    )
    port = relay3.smtp_ports()[mode]
    if client == "smtplib":
        await asyncio.to_thread(_smtplib_send, port, mode, mech, data, client_tls)
    elif client == "aiosmtplib":
        await _aiosmtplib_send(port, mode, mech, data, client_tls)
    else:
        await _swaks_send(port, mode, mech, data, tmp_path)
    await wait_states(relay3, sent=1)
    [delivered] = outbox(relay3)
    assert strip_received(delivered) == data

    [row] = await relay3.queue.search()
    timeline = await relay3.queue.timeline(row.id)
    received = timeline[0]
    assert received["type"] == "received"
    assert received["tls"] is (mode != PLAIN)
    assert received.get("user") == (USER if mech else None)
    assert [e["type"] for e in timeline] == ["received", "attempt", "sent"]
    assert f"id {row.id}".encode() in delivered.split(b"\r\n\r\n")[0]
