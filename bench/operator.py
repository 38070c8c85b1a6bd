"""The operator surface under load: search and page latency on a full queue, what watching
the relay costs its SMTP side, and HTTP submission against SMTP.

    .venv/bin/python -m bench.operator            # full run (~10 minutes)
    .venv/bin/python -m bench.operator --quick    # small queue, one run each (~2 minutes)

1. The queue is filled with `--fill` messages (100,000) through SMTP while the only upstream
   is down, so they stay queued. Then, while a paced client keeps sending 200 msg/s over
   SMTP, the API's search (several filters) and the overview page are timed: p50/p95 ms.
2. SMTP accept rate (smtp-source, 5 KB, 20 sessions) alone, and with an observer that
   loads the overview page every 2 s and scrapes /metrics every second; the runs
   alternate, the figure is the ratio of medians.
3. `POST /api/v1/messages` at 20 concurrent clients with 5 KB JSON messages against
   smtp-source's accept rate at 5 KB / 20 sessions, alternating: the ratio of medians.
   The HTTP load comes from ApacheBench (C, as smtp-source is; installed from Debian's
   apache2-utils when missing), or a Python client when it cannot be had.

Everything listens on 127.0.0.1 only; every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

from bench.perf import (
    HOST,
    BenchError,
    RelayProcess,
    Sink,
    ensure_postfix,
    free_port,
    log,
    smtp_source,
    smtp_upstream,
    write_report,
)

TOKEN_VARIABLE = "BENCH_OPS_TOKEN"
TOKEN = "bench-operator-token-0123456789"
# 5,000 characters in lines of 69 plus CRLF, as text an application sends (and as
# smtp-source's bodies are lines): no line needs quoted-printable.
BODY_5K = "".join(
    "The quick brown fox jumps over the lazy dog, then naps by the fire.\r\n" for _ in range(73)
)[:5000]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def relay_with_web(top: Path, *, upstream_port: int) -> Iterator[tuple[RelayProcess, str]]:
    """A relay whose only upstream is `upstream_port`, with an admin token and a web
    port of our choosing."""
    relay = RelayProcess(
        top,
        upstream=smtp_upstream(upstream_port),
        schedule=["1h"],
        log_level="info",
        workers=None,
    )
    web_port = free_port()
    text = relay.config.read_text()
    text = text.replace(
        f'[web]\nlisten = "{HOST}:0"\n',
        f'[web]\nlisten = "{HOST}:{web_port}"\n\n[[web.tokens]]\nname = "bench"\n'
        f'token = "env:{TOKEN_VARIABLE}"\nrole = "admin"\n',
    )
    relay.config.write_text(text)
    os.environ[TOKEN_VARIABLE] = TOKEN
    relay.start()
    try:
        yield relay, f"http://{HOST}:{web_port}"
    finally:
        relay.stop()


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def paced_smtp(port: int, *, rate: float, until: asyncio.Event) -> int:
    """Send 5 KB messages at `rate` per second over a few reused sessions until told."""
    message = (
        f"From: load@example.com\r\nTo: someone@example.org\r\nSubject: paced load\r\n\r\n"
        f"{BODY_5K}\r\n"
    ).encode()
    sent = 0
    sessions = 4

    async def session(index: int) -> None:
        nonlocal sent
        client = aiosmtplib.SMTP(hostname=HOST, port=port, start_tls=False)
        await client.connect()
        step = sessions / rate
        next_at = time.monotonic() + index / rate
        try:
            while not until.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(until.wait(), delay)
                    continue
                await client.sendmail("load@example.com", ["someone@example.org"], message)
                sent += 1
                next_at += step
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException):
                await client.quit()

    await asyncio.gather(*(session(i) for i in range(sessions)))
    return sent


async def login(http: aiohttp.ClientSession, url: str) -> None:
    """Log in as a browser does: the form's CSRF token first, then the token."""
    async with http.get(f"{url}/login") as resp:
        found = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    if found is None:
        raise BenchError("the login page has no CSRF field")
    form = {"token": TOKEN, "csrf": found.group(1), "next": "/"}
    async with http.post(f"{url}/login", data=form, allow_redirects=False) as resp:
        if resp.status not in (302, 303):
            raise BenchError(f"login to the page failed: {resp.status} {await resp.text()}")


QUERIES: dict[str, str] = {
    "first page, no filter": "/api/v1/messages?limit=50",
    "state = deferred": "/api/v1/messages?state=deferred&limit=50",
    "recipient substring": "/api/v1/messages?recipient=nobody-matches&limit=50",
    "sender substring": "/api/v1/messages?sender=load@&limit=50",
    "subject substring": "/api/v1/messages?subject=paced&limit=50",
}


async def search_latency(url: str, smtp_port: int, *, requests: int) -> dict[str, list[float]]:
    """Each query and the overview page `requests` times while SMTP runs at 200 msg/s."""
    stop = asyncio.Event()
    load = asyncio.create_task(paced_smtp(smtp_port, rate=200.0, until=stop))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timings: dict[str, list[float]] = {}
    jar = aiohttp.CookieJar(unsafe=True)
    try:
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            await login(http, url)
            # A cursor deep in the list: the last id of the 20th page.
            cursor = None
            for _ in range(20):
                query = f"{url}/api/v1/messages?limit=500" + (f"&before={cursor}" if cursor else "")
                async with http.get(query, headers=headers) as resp:
                    page = await resp.json()
                cursor = page.get("next_cursor") or cursor
            deep = f"/api/v1/messages?limit=50&before={cursor}"
            for _ in range(requests):
                for name, path in {**QUERIES, "page 21 by cursor": deep}.items():

                    async def get(path: str = path) -> None:
                        async with http.get(url + path, headers=headers) as resp:
                            if resp.status != 200:
                                raise BenchError(f"{path}: {resp.status} {await resp.text()}")
                            await resp.read()

                    timings.setdefault(name, []).append(await timed(get))

                async def overview() -> None:
                    async with http.get(f"{url}/") as resp:
                        if resp.status != 200:
                            raise BenchError(f"overview: {resp.status}")
                        await resp.read()

                timings.setdefault("overview page", []).append(await timed(overview))
    finally:
        stop.set()
        sent = await load
    log(f"  {sent} messages sent at 200 msg/s meanwhile")
    return timings


async def observe(url: str, stop: asyncio.Event) -> int:
    """The page open and refreshing (every 2 s) and Prometheus scraping (every 1 s)."""
    done = 0
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        await login(http, url)
        tick = 0
        while not stop.is_set():
            async with http.get(f"{url}/metrics") as resp:
                await resp.read()
            if tick % 2 == 0:
                async with http.get(f"{url}/") as resp:
                    await resp.read()
            done += 1
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    return done


def accept_rate(port: int, count: int) -> float:
    return count / smtp_source(port, size=5_000, count=count, sessions=20, timeout=300)


def observed_accept_rate(port: int, url: str, count: int) -> float:
    async def run() -> float:
        stop = asyncio.Event()
        watcher = asyncio.create_task(observe(url, stop))
        await asyncio.sleep(0)  # the observer's first requests go out with the load
        rate = await asyncio.to_thread(accept_rate, port, count)
        stop.set()
        await watcher
        return rate

    return asyncio.run(run())


API_PAYLOAD = {
    "from": "app@example.com",
    "to": ["someone@example.org"],
    "subject": "api load",
    "text": BODY_5K,
}


def ensure_ab() -> str | None:
    """ApacheBench (Debian's apache2-utils): a load generator in C, as smtp-source is for
    SMTP, so the client's own CPU weighs on both sides alike. Installed when missing and
    root; None (the Python client is used instead) otherwise."""
    found = shutil.which("ab")
    if found or os.geteuid() != 0:
        return found
    log("installing apache2-utils (ab)")
    done = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "apache2-utils"],
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        capture_output=True,
        timeout=600,
        check=False,
    )
    return shutil.which("ab") if done.returncode == 0 else None


def ab_rate(ab: str, url: str, count: int, top: Path, clients: int = 20) -> float:
    """`count` JSON submissions by `clients` keep-alive connections of ApacheBench."""
    body = top / "payload.json"
    body.write_text(json.dumps(API_PAYLOAD))
    done = subprocess.run(
        [
            ab,
            "-q",
            "-k",
            "-c",
            str(clients),
            "-n",
            str(count),
            "-p",
            str(body),
            "-T",
            "application/json",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            f"{url}/api/v1/messages",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    rate = re.search(r"Requests per second:\s+([\d.]+)", done.stdout)
    bad = re.search(r"(Non-2xx responses|Failed requests):\s+([1-9]\d*)", done.stdout)
    if done.returncode != 0 or rate is None or bad is not None:
        raise BenchError(f"ab failed (exit {done.returncode}):\n{done.stdout[-1500:]}{done.stderr}")
    return float(rate.group(1))


async def api_rate(url: str, count: int, clients: int = 20) -> float:
    """`count` JSON submissions of 5 KB by `clients` concurrent clients: messages/s."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    payload = API_PAYLOAD
    left = count

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with http.post(f"{url}/api/v1/messages", json=payload, headers=headers) as r:
                if r.status != 202:
                    raise BenchError(f"POST /api/v1/messages: {r.status} {await r.text()}")
                await r.read()

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return count / (time.monotonic() - started)


def fill(port: int, count: int) -> None:
    log(f"filling the queue with {count:,} messages (upstream down)")
    done = 0
    while done < count:
        batch = min(20_000, count - done)
        smtp_source(port, size=5_000, count=batch, sessions=20, timeout=600)
        done += batch
        log(f"  {done:,} queued")


def run(args: argparse.Namespace) -> str:
    ensure_postfix()
    ab = ensure_ab()
    client = "ApacheBench (ab -k)" if ab else "a Python aiohttp client"
    runs = args.runs or (1 if args.quick else 3)
    count = args.count or (1_000 if args.quick else 5_000)
    lines = ["# Operator surface under load", ""]
    with tempfile.TemporaryDirectory(prefix="relay-bench-operator-") as tmp:
        top = Path(tmp)
        down = free_port()  # nothing listens: every attempt is refused, mail stays queued
        with relay_with_web(top / "full", upstream_port=down) as (relay, url):
            fill(relay.port, args.fill or (5_000 if args.quick else 100_000))
            timings = asyncio.run(search_latency(url, relay.port, requests=args.requests))
        lines += [
            f"## Search and overview with {args.fill or (5_000 if args.quick else 100_000):,}"
            " messages queued, SMTP at 200 msg/s",
            "",
            "| request | p50 ms | p95 ms | target p95 |",
            "|---|---|---|---|",
        ]
        for name, values in timings.items():
            lines.append(
                f"| {name} | {statistics.median(values):.1f} | {pct(values, 0.95):.1f} | ≤ 100 |"
            )
        sink = Sink(top)
        sink.start()
        try:
            with relay_with_web(top / "watched", upstream_port=sink.port) as (relay, url):
                plain: list[float] = []
                watched: list[float] = []
                api: list[float] = []
                smtp: list[float] = []
                accept_rate(relay.port, 300)  # warm up
                for i in range(runs):
                    for which in ("plain", "watched") if i % 2 == 0 else ("watched", "plain"):
                        if which == "plain":
                            plain.append(accept_rate(relay.port, count))
                        else:
                            watched.append(observed_accept_rate(relay.port, url, count))
                    smtp.append(accept_rate(relay.port, count))
                    api.append(
                        ab_rate(ab, url, count, top) if ab else asyncio.run(api_rate(url, count))
                    )
                    log(
                        f"run {i + 1}/{runs}: SMTP {plain[-1]:.0f} msg/s, watched"
                        f" {watched[-1]:.0f}, API {api[-1]:.0f}, SMTP again {smtp[-1]:.0f}"
                    )
        finally:
            sink.stop()
    p, w = statistics.median(plain), statistics.median(watched)
    a, s = statistics.median(api), statistics.median(smtp)
    lines += [
        "",
        f"## Watching costs the SMTP side (5 KB, 20 sessions, {count} messages, medians of {runs})",
        "",
        "| figure | msg/s | ratio | target |",
        "|---|---|---|---|",
        f"| SMTP accepted, nobody watching | {p:.0f} | 1.00 | |",
        f"| SMTP accepted, page every 2 s and /metrics every 1 s | {w:.0f} | **{w / p:.2f}** |"
        " ≥ 0.95 |",
        "",
        f"## HTTP submission against SMTP (5 KB, 20 concurrent clients, {count} messages;"
        f" HTTP load from {client}, SMTP load from smtp-source)",
        "",
        "| figure | msg/s | ratio | target |",
        "|---|---|---|---|",
        f"| SMTP accepted (smtp-source) | {s:.0f} | 1.00 | |",
        f"| POST /api/v1/messages (JSON) | {a:.0f} | **{a / s:.2f}** | ≥ 1.0 |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--count", type=int, default=0, help="messages per throughput run")
    parser.add_argument("--fill", type=int, default=0, help="messages queued for the search")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per query")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        text = run(args)
    except BenchError as exc:
        print(f"bench.operator: {exc}", file=sys.stderr)
        return 1
    write_report("operator", text, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
