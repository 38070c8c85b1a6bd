"""The operator surface's reads on a full queue: `find` (the message search of the API and
the page), `counts()` and `oldest()`, on SQLite (two shards, as with two workers) and
PostgreSQL, each filled with the same messages.

    .venv/bin/python -m bench.search            # 100,000 messages, 30 timings per query
    .venv/bin/python -m bench.search --quick    # 10,000 messages, 10 timings per query

The queue is filled through the engines (inserts, then claims and rounds that leave it as
a busy relay's queue looks: mostly sent, some deferred, failed, held and queued), so the
indexes, meta and timelines are the ones the relay writes. Each query runs `--repeat`
times after one warm-up; the table gives p50 and p95 in ms. The target (issue 11) is a
p95 well under 100 ms at 100,000 messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.queue import postgres
from relay.message import Envelope, EventType, Kind, NewMessage, Status, new_message_id
from relay.queue.base import MessageQuery, Queue, Round
from relay.queue.postgres.engine import PostgresQueue
from relay.queue.sqlite.engine import SQLiteQueue
from tests.fakes.postgres import create_database

SUBJECTS = ("Invoice {n}", "Welcome aboard, {n}", "Password reset", "Your order {n} shipped")
UPSTREAMS = ("ses", "sendgrid", "mailgun")
# What a busy relay's queue holds, by share of the messages.
STATES = ((Status.SENT, 0.85), (Status.DEFERRED, 0.05), (Status.FAILED, 0.03))
HELD_SHARE = 0.01  # the rest stays queued


def message(n: int, now: float, count: int) -> NewMessage:
    rng = random.Random(n)
    rcpts = tuple(f"user{rng.randrange(20_000)}@d{rng.randrange(50)}.example" for _ in range(2))
    subject = rng.choice(SUBJECTS).format(n=n)
    data = (
        f"From: app{n % 20}@example.com\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
        "Content-Type: text/plain\r\n\r\n" + "x" * 500 + "\r\n"
    ).encode()
    at = now - (count - n) * 0.5  # two a second, the newest just now
    return NewMessage(
        id=new_message_id(at),
        kind=Kind.OUTBOUND,
        envelope=Envelope(f"app{n % 20}@example.com", rcpts, crlf_only=True),
        data=data,
        received_at=at,
        received={"client": "127.0.0.1"},
    )


def round_for(state: Status, upstream: str, rcpts: Sequence[str]) -> Round:
    now = time.time()
    if state is Status.SENT:
        attempt = {"upstream": upstream, "outcome": "accepted", "provider_id": f"p-{now}"}
        return Round(
            events=[(EventType.ATTEMPT, now, attempt)],
            delivered=[
                {
                    "upstream": upstream,
                    "provider_id": attempt["provider_id"],
                    "recipients": list(rcpts),
                }
            ],
            failed={},
            new_failures=False,
            retry=False,
            sent_detail={"deliveries": [{"upstream": upstream}]},
        )
    attempt = {"upstream": upstream, "outcome": "transient", "reason": "421 try later"}
    if state is Status.DEFERRED:
        return Round(
            events=[(EventType.ATTEMPT, now, attempt)],
            delivered=[],
            failed={},
            new_failures=False,
            retry=True,
            pending=tuple(rcpts),
            next_attempt=now + 86_400,
            reason="421 try later",
        )
    failed = dict.fromkeys(rcpts, "550 no such user")
    return Round(
        events=[(EventType.ATTEMPT, now, {**attempt, "outcome": "permanent"})],
        delivered=[],
        failed=failed,
        new_failures=True,
        retry=False,
        failure="550 no such user",
    )


async def fill(queues: Sequence[Queue], count: int) -> None:
    """`count` messages over the queues (round robin), then rounds that give them their
    states. Concurrent, so the engines' group commits do the batching."""
    now = time.time()
    chunk = 500
    for start in range(0, count, chunk):
        batch = [message(n, now, count) for n in range(start, min(count, start + chunk))]
        await asyncio.gather(*(queues[i % len(queues)].insert(m) for i, m in enumerate(batch)))
    plan = random.Random(7)
    for queue in queues:
        while True:
            items = await queue.claim(Kind.OUTBOUND, now=now, lease_time=600, limit=chunk)
            if not items:
                break
            todo = []
            for item in items:
                draw, state = plan.random(), None
                for candidate, share in STATES:
                    if draw < share:
                        state = candidate
                        break
                    draw -= share
                if state is None:
                    continue  # stays leased here, released below
                rnd = round_for(state, plan.choice(UPSTREAMS), item.envelope.rcpt_tos)
                todo.append(queue.record_round(item, now=now, rounds=1, rnd=rnd))
            await asyncio.gather(*todo)
        # What the rounds above left leased goes back to queued; a few are held.
        await queue.recover(now=now + 1_000, alive=lambda _owner: False)
    for queue in queues:
        queued = await queue.search(state="queued", limit=count)
        for row in queued[: int(count * HELD_SHARE / len(queues))]:
            await queue.hold(row.id, now=now, actor="bench")


@dataclass
class Timing:
    name: str
    p50: float
    p95: float
    found: int


async def timed(name: str, fn: Callable[[], Awaitable[Any]], repeat: int) -> Timing:
    result = await fn()  # warm-up
    took = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = await fn()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    found = len(result) if isinstance(result, list | dict) else int(result is not None)
    return Timing(
        name, took[len(took) // 2], took[min(len(took) - 1, int(len(took) * 0.95))], found
    )


async def measure(queue: Queue, count: int, repeat: int) -> list[Timing]:
    newest = await queue.find(MessageQuery(limit=count))
    deep = newest[int(len(newest) * 0.9)].id  # a cursor 90 % down the list
    rare = newest[len(newest) // 2].meta["rcpts_original"][0]  # one user's address
    queries: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("first page, no filter", lambda: queue.find(MessageQuery())),
        ("recipient (one user)", lambda: queue.find(MessageQuery(recipient=rare))),
        ("recipient (domain)", lambda: queue.find(MessageQuery(recipient="@d7.example"))),
        ("sender", lambda: queue.find(MessageQuery(sender="app3@"))),
        ("state=failed", lambda: queue.find(MessageQuery(state="failed"))),
        ("state=held", lambda: queue.find(MessageQuery(state="held"))),
        ("subject", lambda: queue.find(MessageQuery(subject="password"))),
        ("subject (no match)", lambda: queue.find(MessageQuery(subject="no such subject"))),
        ("upstream + state", lambda: queue.find(MessageQuery(upstream="mailgun", state="failed"))),
        ("since last hour", lambda: queue.find(MessageQuery(since=time.time() - 3_600))),
        ("cursor 90 % deep", lambda: queue.find(MessageQuery(before=deep))),
        ("counts()", queue.counts),
        ("oldest()", lambda: queue.oldest(states=("queued", "deferred", "sending", "held"))),
    ]
    return [await timed(name, fn, repeat) for name, fn in queries]


@contextlib.asynccontextmanager
async def sqlite_queues(top: Path) -> AsyncIterator[list[Queue]]:
    queues: list[Queue] = [
        SQLiteQueue(top / "queue", owner=f"bench:{i}:0", shard=i, workers=2) for i in range(2)
    ]
    for q in queues:
        await q.start()
    try:
        yield queues
    finally:
        for q in queues:
            await q.close()


@contextlib.asynccontextmanager
async def postgres_queues(top: Path) -> AsyncIterator[list[Queue]]:
    with postgres(top) as cluster:
        queue = PostgresQueue(await create_database(cluster.dsn), owner="bench:0:0")
        await queue.start()
        try:
            yield [queue]
        finally:
            await queue.close()


async def bench_engine(
    name: str, opened: contextlib.AbstractAsyncContextManager[list[Queue]], args: argparse.Namespace
) -> tuple[list[Timing], float, dict[str, int]]:
    async with opened as queues:
        started = time.monotonic()
        await fill(queues, args.count)
        filled = time.monotonic() - started
        if isinstance(queues[0], PostgresQueue):
            await queues[0]._with_conn(lambda c: c.execute("ANALYZE"))
        counts = await queues[0].counts()
        print(f"{name}: {args.count} messages filled in {filled:.0f} s: {counts}", flush=True)
        return await measure(queues[0], args.count, args.repeat), filled, counts


def table(results: dict[str, list[Timing]]) -> list[str]:
    names = list(results)
    lines = [
        "| query | " + " | ".join(f"{n} p50 ms | {n} p95 ms" for n in names) + " | found |",
        "|---|" + "---|---|" * len(names) + "---|",
    ]
    for i, first in enumerate(results[names[0]]):
        cells = " | ".join(f"{results[n][i].p50:.1f} | {results[n][i].p95:.1f}" for n in names)
        lines.append(f"| {first.name} | {cells} | {first.found} |")
    return lines


async def run(args: argparse.Namespace) -> str:
    top = Path(tempfile.mkdtemp(prefix="relay-search-bench-"))
    top.chmod(0o755)  # the postgres user (PostgreSQL refuses root) must reach its directory
    results: dict[str, list[Timing]] = {}
    try:
        if "sqlite" in args.engines:
            results["SQLite (2 shards)"], _, _ = await bench_engine(
                "sqlite", sqlite_queues(top), args
            )
        if "postgres" in args.engines:
            results["PostgreSQL"], _, _ = await bench_engine("postgres", postgres_queues(top), args)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    head = f"{args.count} messages, {args.repeat} timings per query (after one warm-up)"
    return "\n".join([head, "", *table(results)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 messages, 10 timings")
    parser.add_argument("--count", type=int, default=0, help="messages in the queue")
    parser.add_argument("--repeat", type=int, default=0, help="timings per query")
    parser.add_argument("--engines", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args(argv)
    args.count = args.count or (10_000 if args.quick else 100_000)
    args.repeat = args.repeat or (10 if args.quick else 30)
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
