"""Segment bodies under SIGKILL: a real `relay serve` killed while clients send 100 KB
messages, and killed while it compacts its segments. Every message that got a 250 (and
was not deleted by the operator) is delivered afterwards, with its body intact."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosmtplib
import pytest

from relay.queue.sqlite.engine import SQLiteQueue
from relay.queue.sqlite.segments import segment_dir, segment_seqs
from relay.queue.sqlite.store import db_path
from tests.fakes.relay_process import RelayProcess, free_port
from tests.test_crash_safety import delivered_tokens

SIZE = 100 * 1024
Configure = Callable[..., tuple[RelayProcess, int, Path]]


def message(token: str) -> bytes:
    head = f"From: <app@example.com>\r\nTo: <r@example.org>\r\nSubject: {token}\r\n\r\n"
    line = f"{token} body line\r\n"
    return (head + line * ((SIZE - len(head)) // len(line))).encode()


def delivered_bodies(outbox: Path) -> dict[str, bytes]:
    found = {}
    for path in (outbox / "new").iterdir() if (outbox / "new").exists() else ():
        data = path.read_bytes()
        token = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        found[token] = data
    return found


@pytest.fixture
async def relay_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Configure]:
    """(process, SMTP port, outbox) for a config delivering to a maildir, or to an SMTP
    port nobody listens on (everything deferred for an hour)."""
    # Small segments, so rotation and compaction happen within a few hundred messages.
    monkeypatch.setenv("RELAY_SEGMENT_ROTATE_BYTES", str(4 * SIZE))
    port = free_port()
    outbox = tmp_path / "outbox"
    started: list[RelayProcess] = []

    def make(*, workers: int = 1, down: bool = False) -> tuple[RelayProcess, int, Path]:
        # Two names: the breaker the unreachable one opened (shared routing state, kept
        # across restarts) must not hold back the maildir that replaces it.
        upstream = (
            f'type = "smtp"\nhost = "127.0.0.1"\nport = {free_port()}\ntls = "none"'
            if down
            else f'type = "maildir"\npath = "{outbox}"'
        )
        config = tmp_path / f"config-{len(started)}.toml"
        config.write_text(f"""
[server]
hostname = "relay.test"
queue = "{tmp_path / "queue"}"
min_free_disk = 0
workers = {workers}
[[smtp.listen]]
address = "127.0.0.1:{port}"
tls = "none"
[retry]
schedule = ["{"1h" if down else "1s"}"]
bounces = false
[[upstream]]
name = "{"nowhere" if down else "outbox"}"
{upstream}
[web]
listen = "127.0.0.1:0"
""")
        proc = RelayProcess(config)
        started.append(proc)
        return proc, port, outbox

    yield make
    for proc in started:
        await proc.stop()


async def send(port: int, token: str) -> bool:
    try:
        await aiosmtplib.send(
            message(token),
            sender="app@example.com",
            recipients=["r@example.org"],
            hostname="127.0.0.1",
            port=port,
            timeout=10,
            start_tls=False,
        )
    except (aiosmtplib.SMTPException, OSError):
        return False  # the relay is gone: not acknowledged, may be lost
    return True


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
async def test_acknowledged_100kb_messages_survive_sigkill(
    relay_config: Configure, workers: int
) -> None:
    proc, port, outbox = relay_config(workers=workers)
    await proc.start()
    acked: set[str] = set()
    enough = asyncio.Event()
    tokens = iter(range(400))

    async def client() -> None:
        for i in tokens:
            token = f"token-{i:04d}"
            if not await send(port, token):
                return
            acked.add(token)
            if len(acked) >= 150:
                enough.set()

    clients = [asyncio.create_task(client()) for _ in range(20)]
    await asyncio.wait_for(enough.wait(), 60)
    await proc.kill()
    await asyncio.gather(*clients)

    await proc.start()
    async with asyncio.timeout(60):
        while not acked <= set(delivered_tokens(outbox)):
            await asyncio.sleep(0.05)
    bodies = delivered_bodies(outbox)
    damaged = [t for t in acked if message(t).split(b"\r\n\r\n", 1)[1] not in bodies[t]]
    print(f"\nsegment crash: {len(acked)} acknowledged, 0 lost", file=sys.stderr)
    assert not damaged


async def test_sigkill_during_compaction_loses_nothing(relay_config: Configure) -> None:
    proc, port, outbox = relay_config(down=True)
    await proc.start()
    tokens = [f"token-{i:04d}" for i in range(160)]
    for batch in range(0, len(tokens), 20):
        assert all(await asyncio.gather(*(send(port, t) for t in tokens[batch : batch + 20])))
    queue_dir = proc.config.parent / "queue"
    operator = SQLiteQueue(queue_dir, owner="operator:1:1")
    try:
        async with asyncio.timeout(30):  # every first attempt over, all deferred
            while await operator.counts() != {"deferred": len(tokens)}:
                await asyncio.sleep(0.05)
        # Three of every four deleted: each segment a quarter live, so all are compacted.
        rows = sorted(await operator.search(limit=1000), key=lambda r: r.id)
        kept = set()
        for n, row in enumerate(rows):
            if n % 4 == 1:
                kept.add(row.meta["subject"])
            else:
                await operator.delete(row.id, actor="test")
        directory = segment_dir(db_path(queue_dir))
        segments_before = len(segment_seqs(directory))
        kills = 0
        for _ in range(3):  # killed at its first compaction step, as long as there is one
            try:
                await proc.wait_log("compacting message body segment", timeout=10)
            except TimeoutError:
                break  # all compacted before the previous kill landed
            await proc.kill()
            kills += 1
            proc, _port, _outbox = relay_config(down=True)
            await proc.start()
        assert kills >= 1
        print(
            f"\ncompaction crash: {kills} kills, segments {segments_before} ->"
            f" {len(segment_seqs(directory))}",
            file=sys.stderr,
        )
        # Stopped first: a relay still running with its upstream down would take the
        # flushed messages at once and put them off for another hour.
        await proc.stop()
        await operator.flush(now=time.time(), actor="test")
    finally:
        await operator.close()
    proc, _port, _outbox = relay_config()
    await proc.start()
    async with asyncio.timeout(60):
        while set(delivered_tokens(outbox)) != kept:
            await asyncio.sleep(0.05)
    bodies = delivered_bodies(outbox)
    assert all(message(t).split(b"\r\n\r\n", 1)[1] in bodies[t] for t in kept)
