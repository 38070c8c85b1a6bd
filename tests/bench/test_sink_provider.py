"""The benchmark's cheap HTTP provider (bench/sink_provider.py) speaks enough HTTP/1.1 for
aiohttp's client and the relay's sendgrid upstream: keep-alive, pipelined requests, large
bodies, the answer SendGrid gives, and a clear refusal of what it does not decode."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from bench.sink_provider import Counters, start
from relay.message import Envelope
from relay.upstreams.http import shared_session
from relay.upstreams.sendgrid import SendGridUpstream

KEY = "bench-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@dataclass
class Running:
    url: str
    port: int
    counters: Counters


@pytest.fixture
async def provider() -> AsyncIterator[Running]:
    server, counters = await start("127.0.0.1", 0, KEY)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield Running(f"http://127.0.0.1:{port}", port, counters)


async def test_several_requests_share_one_keep_alive_connection(provider: Running) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        ids = []
        for n in range(5):
            body = b'{"n": %d}' % n + b" " * (n * 1000)
            async with session.post(
                provider.url + "/v3/mail/send", data=body, headers=AUTH
            ) as resp:
                assert resp.status == 202
                assert await resp.read() == b""
                ids.append(resp.headers["X-Message-Id"])
        async with session.get(provider.url + "/count") as resp:
            assert await resp.text() == "5"
    assert len(set(ids)) == 5
    assert provider.counters.connections == 1
    assert provider.counters.body_bytes == sum(len(b'{"n": %d}' % n) + n * 1000 for n in range(5))


async def test_pipelined_requests_split_anywhere_are_answered_in_order(
    provider: Running,
) -> None:
    def post(body: bytes) -> bytes:
        return (
            b"POST /v3/mail/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    stream = (
        post(b"a" * 10)
        + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        + post(b"b" * 70_000)
        + b"POST /v3/mail/send HTTP/1.1\r\nContent-Length: 3\r\nAuthorization: Bearer no\r\n\r\nabc"
        + b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", provider.port)
    try:
        # Cut the stream at awkward places: inside a "\r\n\r\n", inside a body, and all
        # the rest in one write.
        first_cut = stream.index(b"\r\n\r\n") + 2
        for piece in (
            stream[:first_cut],
            stream[first_cut : first_cut + 5],
            stream[first_cut + 5 :],
        ):
            writer.write(piece)
            await writer.drain()
        statuses = []
        last_body = b""
        for _ in range(5):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            statuses.append(int(head.split(b" ", 2)[1]))
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            last_body = await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    assert statuses == [202, 404, 202, 401, 200]
    assert last_body == b"2"


async def test_large_bodies_are_counted_and_accepted(provider: Running) -> None:
    big = b"x" * (12 * 1000**2)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(provider.url + "/v3/mail/send", data=big, headers=AUTH) as resp:
                assert resp.status == 202
    assert provider.counters.body_bytes == 2 * len(big)
    assert provider.counters.accepted == 2


async def test_a_chunked_body_is_refused_and_the_next_connection_works(
    provider: Running,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a":'
        yield b"1}"

    async with aiohttp.ClientSession() as session:
        async with session.post(
            provider.url + "/v3/mail/send", data=chunks(), headers=AUTH
        ) as resp:
            assert resp.status == 411
            assert resp.headers["Connection"] == "close"
        async with session.post(provider.url + "/v3/mail/send", data=b"{}", headers=AUTH) as resp:
            assert resp.status == 202
    assert provider.counters.accepted == 1


async def test_the_relays_sendgrid_upstream_records_the_message_id(provider: Running) -> None:
    upstream = SendGridUpstream("sink", api_key=KEY, base_url=provider.url, timeout=5.0)
    await upstream.start()
    try:
        message = (
            b"From: <from@example.com>\r\nTo: <to@example.org>\r\nSubject: hi\r\n"
            b"Message-ID: <1@example.com>\r\n\r\n" + b"line of text\r\n" * 50_000
        )
        envelope = Envelope("from@example.com", ("to@example.org",), queue_id="01QUEUEID")
        first = await upstream.send(envelope, message)
        second = await upstream.send(envelope, message)
    finally:
        await upstream.close()
    assert shared_session.users == 0
    assert first.provider_id == "bench000000000001.sink"
    assert second.provider_id == "bench000000000002.sink"
    assert provider.counters.connections == 1  # the relay's pool kept the connection


async def test_the_provider_process_serves_on_uvloop() -> None:
    """As bench.perf runs it: its own process, on uvloop, the key from the environment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.sink_provider",
        str(port),
        env={**os.environ, "BENCH_PROVIDER_KEY": KEY},
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:  # until it listens
                    try:
                        async with session.get(url + "/count") as resp:
                            assert await resp.text() == "0"
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
            for _ in range(3):
                async with session.post(url + "/v3/mail/send", data=b"{}", headers=AUTH) as resp:
                    assert resp.status == 202
            async with session.get(url + "/count") as resp:
                assert await resp.text() == "3"
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, stderr.decode()
    assert stderr == b""
