"""CPU per message of the SQLite queue's store alone: bodies as blobs in SQLite against
bodies in append-only segment files (relay.queue.sqlite.segments).

    .venv/bin/python -m bench.store                      # 5 KB, 100 KB, 1 MB; 5 runs each
    .venv/bin/python -m bench.store --sizes 100 --runs 9

Each run opens a fresh SQLiteQueue (its real writer thread and group commit) and pushes
messages through insert -> claim -> sent the way the relay does: SESSIONS concurrent
inserters (one group commit serves them all), a dispatcher claiming batches of 50 and
recording each as sent. The figure is time.process_time() of the whole process (the
writer thread included) divided by the messages; the modes take turns within each
repetition, so the machine's noise hits them alike. Modes:

  blob      every body in SQLite (the layout before segments: queries.INLINE_MAX huge)
  segment   every body in a segment file (INLINE_MAX 0)
  auto      the shipped rule: up to queries.INLINE_MAX inline, larger ones in segments
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

from relay.message import Envelope, EventType, Kind, NewMessage, new_message_id
from relay.queue.base import Round
from relay.queue.sqlite import queries
from relay.queue.sqlite.engine import SQLiteQueue

SESSIONS = 20
CLAIM = 50
MODES = {"blob": 1 << 62, "segment": 0, "auto": queries.INLINE_MAX}
# Enough messages that the WAL checkpoints a few times at every size.
COUNTS = {5: 6000, 100: 3000, 1024: 400}


def _message(data: bytes) -> NewMessage:
    now = time.time()
    return NewMessage(
        id=new_message_id(now),
        kind=Kind.OUTBOUND,
        envelope=Envelope("app@example.com", ("r@example.org",), crlf_only=True),
        data=data,
        received_at=now,
        received={"client": "127.0.0.1"},
    )


def _sent() -> Round:
    return Round(
        events=[(EventType.ATTEMPT, time.time(), {"upstream": "sink", "outcome": "accepted"})],
        delivered=[{"upstream": "sink"}],
        failed={},
        new_failures=False,
        retry=False,
        sent_detail={"deliveries": [{"upstream": "sink"}]},
    )


async def _one_run(directory: Path, size_kb: int, count: int) -> tuple[float, float]:
    """(CPU ms per message, wall ms per message) for one fresh queue."""
    line = b"x" * 76 + b"\r\n"
    data = b"Subject: bench\r\n\r\n" + line * (size_kb * 1024 // len(line))
    queue = SQLiteQueue(directory, owner="bench:1:1")
    await queue.start()
    inserted = asyncio.Queue[None]()
    next_index = iter(range(count))

    async def session() -> None:
        for _ in next_index:
            await queue.insert(_message(data))
            inserted.put_nowait(None)

    async def dispatcher() -> None:
        done = 0
        while done < count:
            await inserted.get()
            items = await queue.claim(Kind.OUTBOUND, now=time.time(), lease_time=60, limit=CLAIM)
            for item in items:
                await queue.record_round(item, now=time.time(), rounds=1, rnd=_sent())
            done += len(items)

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(dispatcher(), *(session() for _ in range(SESSIONS)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await queue.close()
    return cpu * 1000 / count, wall * 1000 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5,100,1024", help="message sizes in KB")
    parser.add_argument("--runs", type=int, default=5, help="repetitions (medians reported)")
    parser.add_argument("--modes", default="blob,segment,auto")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    args = parser.parse_args()
    modes = args.modes.split(",")
    print(f"{'size':>6} {'mode':>8} {'cpu ms/msg':>11} {'wall ms/msg':>12}  runs")
    for size_kb in (int(s) for s in args.sizes.split(",")):
        count = max(50, int(COUNTS.get(size_kb, 200_000 // max(size_kb, 1)) * args.scale))
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for _ in range(args.runs):
            for mode in modes:
                queries.INLINE_MAX = MODES[mode]
                with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
                    results[mode].append(asyncio.run(_one_run(Path(tmp), size_kb, count)))
        for mode in modes:
            cpu = statistics.median(r[0] for r in results[mode])
            wall = statistics.median(r[1] for r in results[mode])
            spread = " ".join(f"{r[0]:.3f}" for r in results[mode])
            print(f"{size_kb:>5}K {mode:>8} {cpu:>11.3f} {wall:>12.3f}  {spread}")
        base = statistics.median(r[0] for r in results[modes[0]])
        for mode in modes[1:]:
            ratio = statistics.median(r[0] for r in results[mode]) / base
            print(f"{'':>6} {mode} / {modes[0]} CPU: {ratio:.2f}")


if __name__ == "__main__":
    main()
