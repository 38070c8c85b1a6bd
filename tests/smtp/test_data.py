"""The DATA reader (issue 10 A, day-one 7): content streamed through bounded buffers into a
spool that moves to disk, checked and unstuffed line by line with the same result as a
whole-message reader, however the bytes are split into reads."""

from __future__ import annotations

import asyncio
import random
import re
import tempfile
import tracemalloc
from pathlib import Path
from typing import IO, Any

import pytest

from relay.smtp import data
from relay.smtp.data import DataError, Spool, read_data

# The bytes-method twin, so the model does not share the C scanner it checks.
from relay.wire import _crlf_only as crlf_only
from tests.conftest import RelayFactory, make_message, outbox, strip_received, wait_states
from tests.smtp.test_bad_input import RawSession

LIMIT = 10_000
TOKENS = [b"a", b"bc", b".", b"..", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n.", b".\r\n", b" "]


def reference(stream: bytes, *, normalize: bool, limit: int) -> tuple[bytes | str, bytes]:
    """What the whole-message reader made of `stream`: (content or refusal, leftover)."""
    raw = b"\r\n" + stream
    end = raw.find(b"\r\n.\r\n")
    content, leftover = raw[: end + 2], raw[end + 5 :]
    if len(content) - 2 > limit:
        return "552", leftover
    if not crlf_only(content):
        if not normalize or content.count(b"\r") != content.count(b"\r\n"):
            return "550", leftover
        content = re.sub(rb"(?<!\r)\n", b"\r\n", content)
    return content.replace(b"\r\n.", b"\r\n")[2:], leftover


def random_stream(rng: random.Random) -> bytes:
    body = b"".join(rng.choice(TOKENS) for _ in range(rng.randrange(0, 120)))
    if rng.random() < 0.1:
        body += b"x" * rng.randrange(LIMIT - 50, LIMIT + 50)  # around the size limit
    return body + b"\r\n.\r\n" + rng.choice([b"", b"NOOP\r\n", b"QUIT\r\nRSET\r\n"])


async def run_reader(stream: bytes, *, normalize: bool, threshold: int) -> tuple[Any, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    spool = Spool(threshold=threshold, directory=None)
    try:
        await read_data(reader, spool, limit=LIMIT, normalize=normalize)
    except DataError as exc:
        return exc.reply[:3], bytes(reader._buffer)  # type: ignore[attr-defined]
    finally:
        content = spool.read() if spool.size else b""
        spool.close()
    return content, bytes(reader._buffer)  # type: ignore[attr-defined]


async def test_block_reader_matches_the_whole_message_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seeded: 3,000 streams of dots, CRs, LFs and CRLFs, read a few bytes at a time and
    processed in tiny blocks, so every boundary falls everywhere."""
    rng = random.Random(10)
    for i in range(3000):
        monkeypatch.setattr(data, "READ_SIZE", rng.choice([1, 2, 3, 7, 64, 4096]))
        monkeypatch.setattr(data, "PROCESS_AT", rng.choice([1, 5, 16, 300]))
        monkeypatch.setattr(data, "MAX_PENDING", rng.choice([8, 40, 1000]))
        stream = random_stream(rng)
        normalize = rng.random() < 0.5
        expected = reference(stream, normalize=normalize, limit=LIMIT)
        got = await run_reader(stream, normalize=normalize, threshold=rng.choice([0, 10, 10**6]))
        assert got == expected, (i, stream, normalize)


async def test_memory_stays_bounded_while_a_large_message_streams_to_disk(
    tmp_path: Path,
) -> None:
    """20 MB through the reader with a 1 MB threshold: Python's peak allocation stays a
    few hundred KB of blocks, the content goes to a file and comes back exactly."""
    line = b"0123456789" * 7 + b"\r\n"
    chunk = line * 900  # ~64 KB
    total = 20 * 1000**2 // len(chunk)
    reader = asyncio.StreamReader()
    spool = Spool(threshold=1000**2, directory=tmp_path)

    async def produce() -> None:
        for _ in range(total):
            reader.feed_data(chunk)
            await asyncio.sleep(0)  # let the reader take it: a yield, not a wait
        reader.feed_data(b".\r\n")

    tracemalloc.start()
    try:
        await asyncio.gather(
            produce(), read_data(reader, spool, limit=25 * 1000**2, normalize=False)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert spool.on_disk
    assert peak < 3 * 1000**2, peak
    content = spool.read()
    spool.close()
    assert len(content) == total * len(chunk) and content == chunk * total


class SpoolFiles:
    """Counts the temporary files the DATA reader opens."""

    def __init__(self) -> None:
        self.opened: list[str | None] = []
        self.real = tempfile.TemporaryFile

    def __call__(self, *, dir: str | Path | None = None, prefix: str = "") -> IO[bytes]:
        self.opened.append(str(dir) if dir else None)
        return self.real(dir=dir, prefix=prefix)


async def test_large_message_is_spooled_beside_the_queue_and_delivered_exactly(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = SpoolFiles()
    monkeypatch.setattr(tempfile, "TemporaryFile", files)
    relay = await make_relay(
        smtp={
            "data_spool_threshold": "256KB",
            "listen": [{"address": "127.0.0.1:0", "tls": "none", "bare_lf": "normalize"}],
        }
    )
    body = b"".join(b".%06d line with a leading dot\r\n" % i for i in range(60_000))  # ~2 MB
    message = make_message(body="") + body
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    await s.cmd("DATA")
    assert (await s.cmd(stuffed + b".\r\n")).startswith("250 2.0.0")
    # Too big for the limit once spooled: refused after its end, the session in sync.
    await s.close()
    assert files.opened == [str(relay.config.queue_dir / "incoming")]
    await wait_states(relay, sent=1)
    [delivered] = outbox(relay)
    assert strip_received(delivered) == message
    assert list((relay.config.queue_dir / "incoming").iterdir()) == []


async def test_too_big_message_is_refused_after_its_end_without_keeping_it(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(smtp={"max_message_size": "1MB", "data_spool_threshold": "100KB"})
    s = await RawSession.open(relay.smtp_ports()[0])
    await s.cmd("EHLO client.test")
    await s.cmd("MAIL FROM:<app@example.com>")
    await s.cmd("RCPT TO:<a@example.org>")
    await s.cmd("DATA")
    reply = await s.cmd(make_message(body="y" * 998 + "\r\n") * 3000 + b".\r\n")
    assert reply.startswith("552 5.3.4"), reply
    assert (await s.cmd("NOOP")).startswith("250")
    await s.close()
    assert await relay.queue.search() == []
