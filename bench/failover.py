"""Failover benchmark: N messages through two fake providers while the primary fails for a
window. Reports messages lost (must be 0), duplicates, extra attempts, and the latency
added during the outage as a ratio against the same run's messages outside it.

    python -m bench.failover [--messages 1000] [--sessions 20] [--outage 2.0] [--status 503]

Everything runs on loopback in one process: the relay (in-process, its own temp queue),
the fake Mailgun (primary) and fake SendGrid (secondary) from tests/fakes/providers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiosmtplib

from relay.app import Relay
from relay.config import parse
from tests.fakes.providers import FAKE_KEY, FakeMailgun, FakeSendGrid


def config(tmp: Path, primary: str, secondary: str) -> dict[str, Any]:
    return {
        "server": {"hostname": "bench.test", "queue": str(tmp / "queue"), "min_free_disk": 0},
        "smtp": {"listen": [{"address": "127.0.0.1:0", "tls": "none", "auth": "none"}]},
        "retry": {"schedule": ["1s"], "max_age": "1h", "bounces": False, "concurrency": 64},
        # A short cool-down so the primary is probed, and recovers, within the run.
        "routing": {"cooldown": "0.5s", "failures_to_open": 3},
        "upstream": [
            {
                "name": "primary",
                "type": "mailgun",
                "api_key": FAKE_KEY,
                "base_url": primary,
                "domain": "mg.example.com",
                "priority": 1,
                "timeout": "5s",
            },
            {
                "name": "secondary",
                "type": "sendgrid",
                "api_key": FAKE_KEY,
                "base_url": secondary,
                "priority": 2,
                "timeout": "5s",
            },
        ],
        "web": {"listen": "127.0.0.1:0"},
    }


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(messages: int, sessions: int, outage: float, status: int) -> dict[str, Any]:
    primary, secondary = FakeMailgun(domain="mg.example.com"), FakeSendGrid()
    await primary.start()
    await secondary.start()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse(config(Path(tmp), primary.url, secondary.url), Path(tmp) / "config.toml")
        relay = Relay(cfg)
        await relay.start()
        port = relay.smtp_ports()[0]
        acked: set[str] = set()
        todo = iter(range(messages))
        outage_span: list[float] = []

        async def client() -> None:
            for i in todo:
                token = f"bench-{i:06d}"
                data = (
                    f"From: <app@example.com>\r\nTo: <r@example.org>\r\nSubject: {token}"
                    f"\r\n\r\n{'failover benchmark body line. ' * 20}\r\n"
                ).encode()
                await aiosmtplib.send(
                    data,
                    sender="app@example.com",
                    recipients=["r@example.org"],
                    hostname="127.0.0.1",
                    port=port,
                    start_tls=False,
                    timeout=30,
                )
                acked.add(token)

        async def outage_window() -> None:
            while len(acked) < messages // 4:
                await asyncio.sleep(0.01)
            primary.fail(status, times=None)
            outage_span.append(time.time())
            await asyncio.sleep(outage)
            primary.reset()
            outage_span.append(time.time())

        started = time.time()
        window = asyncio.create_task(outage_window())
        await asyncio.gather(*(client() for _ in range(sessions)))
        await window

        async def all_sent() -> bool:
            counts = await relay.queue.counts()
            return counts.get("sent", 0) == messages

        await relay.wait_for(all_sent, timeout=120)
        elapsed = time.time() - started
        rows = [
            (row.id, row.created, ev["at"])
            for row in await relay.queue.search(state="sent", limit=messages)
            for ev in await relay.queue.timeline(row.id)
            if ev["type"] == "sent"
        ]
        attempts = sum(s.attempts for s in relay.router.states)
        per_upstream = {s.name: s.snapshot() for s in relay.router.states}
        await relay.stop()

    got: Counter[str] = Counter()
    for r in primary.requests:
        for line in r.body["message"][0].split(b"\r\n"):
            if line.startswith(b"Subject: "):
                got[line[9:].decode()] += 1
    for r in secondary.requests:
        got[r.body["subject"]] += 1
    await primary.stop()
    await secondary.stop()

    start, end = outage_span
    during = [(sent - created) * 1000 for _, created, sent in rows if start <= created <= end]
    outside = [
        (sent - created) * 1000
        for _, created, sent in rows
        if not start - 0.5 <= created <= end + 1.0
    ]
    return {
        "messages": messages,
        "acked": len(acked),
        "elapsed": elapsed,
        "lost": len(acked - set(got)),
        "duplicates": sum(n - 1 for n in got.values()),
        "extra_attempts": attempts - messages,
        "during_p50": p(during, 0.5),
        "during_p95": p(during, 0.95),
        "during_n": len(during),
        "outside_p50": p(outside, 0.5),
        "outside_p95": p(outside, 0.95),
        "outside_n": len(outside),
        "upstreams": per_upstream,
        "primary_share": sum(1 for r in primary.requests) / max(1, len(acked)),
    }


def report(r: dict[str, Any], outage: float, status: int) -> str:
    ratio = r["during_p50"] / r["outside_p50"] if r["outside_p50"] else float("nan")
    lines = [
        f"failover benchmark: {r['messages']} messages, primary answers {status} for "
        f"{outage:.1f}s, run took {r['elapsed']:.1f}s",
        "",
        "| metric | value |",
        "|---|---|",
        f"| messages acknowledged (250) | {r['acked']} |",
        f"| lost | **{r['lost']}** |",
        f"| duplicates | {r['duplicates']} |",
        f"| extra attempts (beyond one per message) | {r['extra_attempts']} |",
        f"| share delivered by the primary | {r['primary_share']:.0%} |",
        f"| accept→sent p50 / p95 outside the outage (ms, n={r['outside_n']}) | "
        f"{r['outside_p50']:.1f} / {r['outside_p95']:.1f} |",
        f"| accept→sent p50 / p95 during the outage (ms, n={r['during_n']}) | "
        f"{r['during_p50']:.1f} / {r['during_p95']:.1f} |",
        f"| added latency during the outage (p50 ratio, same run) | {ratio:.2f}x |",
    ]
    for name, snap in r["upstreams"].items():
        lines.append(
            f"| {name}: attempts / failures / breaker | {snap['attempts']} / "
            f"{snap['failures']} / {snap['breaker']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--outage", type=float, default=2.0, help="seconds the primary fails")
    ap.add_argument("--status", type=int, default=503)
    args = ap.parse_args(argv)
    result = asyncio.run(
        asyncio.wait_for(run(args.messages, args.sessions, args.outage, args.status), timeout=600)
    )
    print(report(result, args.outage, args.status))
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
