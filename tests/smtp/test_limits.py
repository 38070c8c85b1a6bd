"""Sessions under load (issue 10 A, B): connection limits answer 421 4.7.0, and a burst of
connects larger than asyncio's default backlog is greeted (or refused) in full."""

from __future__ import annotations

import asyncio

from relay.app import Relay
from tests.conftest import RelayFactory
from tests.smtp.test_bad_input import RawSession


async def first_line(port: int, source: str = "127.0.0.1") -> tuple[str, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return (await reader.readline()).decode(), writer


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_connections_past_the_limits_get_421(make_relay: RelayFactory) -> None:
    relay = await make_relay(smtp={"max_connections": 3, "max_connections_per_ip": 2})
    port = relay.smtp_ports()[0]
    a = await RawSession.open(port)
    b = await RawSession.open(port)
    line, refused = await first_line(port)
    assert line.startswith("421 4.7.0 relay.test Too many connections from 127.0.0.1"), line
    await closed(refused)
    line, c = await first_line(port, "127.0.0.2")  # another address: within the total
    assert line.startswith("220"), line
    line, refused = await first_line(port, "127.0.0.3")
    assert line.startswith("421 4.7.0 relay.test Too many connections;"), line
    await closed(refused)
    # A session that ends gives its slot back.
    assert (await a.cmd("QUIT")).startswith("221")
    assert await a.reader.read() == b""
    line, d = await first_line(port, "127.0.0.3")
    assert line.startswith("220"), line
    for writer in (c, d):
        await closed(writer)
    await b.close()


async def greeting(port: int) -> str:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:  # refused by the kernel: clean, the client retries later
        return f"refused: {exc}"
    try:
        line = await reader.readline()
    finally:
        writer.close()
    return line.decode()


async def test_burst_of_1000_connects_is_greeted_or_refused_cleanly(
    make_relay: RelayFactory,
) -> None:
    """asyncio's default backlog (100) overflowed: hundreds of connects sat in the kernel
    ungreeted. One client address may hold them all here, so every one is greeted."""
    relay = await make_relay(smtp={"max_connections": 1000, "max_connections_per_ip": 1000})
    port = relay.smtp_ports()[0]
    async with asyncio.timeout(20):
        replies = await asyncio.gather(*(greeting(port) for _ in range(1000)))
    bad = [r for r in replies if not r.startswith(("220 ", "421 4.7.0", "refused"))]
    assert not bad, bad[:5]
    assert sum(r.startswith("220 ") for r in replies) == 1000


async def test_burst_past_the_per_address_limit_is_refused_with_421(relay: Relay) -> None:
    port = relay.smtp_ports()[0]
    async with asyncio.timeout(20):
        replies = await asyncio.gather(*(greeting(port) for _ in range(300)))
    assert all(r.startswith(("220 ", "421 4.7.0")) for r in replies)
    assert sum(r.startswith("220 ") for r in replies) >= 100
