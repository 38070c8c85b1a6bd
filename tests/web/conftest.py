"""A relay with one token of each role, and the headers that use them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import RelayFactory, make_message

# name → (role, token). Written to files, as a deployment would (`file:`).
TOKENS: dict[str, tuple[str, str]] = {
    "ops": ("admin", "admin-token-0123456789abcdef"),
    "viewer": ("read", "read-token-0123456789abcdef"),
    "app": ("submit", "submit-token-0123456789abcdef"),
}


def token_entries(directory: Path, **senders: list[str]) -> list[dict[str, Any]]:
    """[[web.tokens]] entries for TOKENS, each token in its own file under `directory`.
    `senders` gives a token's allowed_senders by name."""
    entries = []
    for name, (role, token) in TOKENS.items():
        path = directory / f"{name}.token"
        path.write_text(token + "\n")
        entry: dict[str, Any] = {"name": name, "token": f"file:{path}", "role": role}
        if name in senders:
            entry["allowed_senders"] = senders[name]
        entries.append(entry)
    return entries


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][1]}"}


def base_url(relay: Relay) -> str:
    return f"http://127.0.0.1:{relay.web_port}"


@pytest.fixture
async def web_relay(make_relay: RelayFactory, tmp_path: Path) -> Relay:
    """A relay whose web listener has the three tokens of TOKENS."""
    return await make_relay(web={"listen": "127.0.0.1:0", "tokens": token_entries(tmp_path)})


async def send_mail(relay: Relay, subject: str, to: str = "alice@example.org") -> None:
    """One message over SMTP (no TLS, from a trusted address) to the relay."""
    await aiosmtplib.send(
        make_message(subject=subject, to=to),
        sender="app@example.com",
        recipients=[to],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )


async def raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send a request's bytes as they are (`head`: the request line and headers, each
    ending CRLF; Content-Length is added for `body`) and return the whole answer: for
    bytes no HTTP client would send."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    length = f"Content-Length: {len(body)}\r\n".encode() if body else b""
    writer.write(head + length + b"Connection: close\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer
