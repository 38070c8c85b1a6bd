"""Several relays on one PostgreSQL queue: hosts that die, a database that stops, and the
routing state they share.

The hosts are relay processes with their own node names, listeners and leases (so none can
tell by its pid that another died: only the lease's expiry frees its work, as between
machines). Where a test needs to look inside a relay it runs several in this process,
each with its own node name.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest

from relay.app import Relay
from relay.queue.postgres.engine import PostgresQueue
from tests.conftest import RelayFactory, make_message, outbox
from tests.fakes.postgres import PostgresCluster, create_database
from tests.fakes.providers import FAKE_KEY, FakeMailgun, FakeSendGrid
from tests.fakes.relay_process import RelayProcess, free_port

HOSTS = 3
MESSAGES = 300
CONCURRENCY = 18
KILL_AFTER_ACKS = 100
TOKEN = re.compile(rb"^Subject: (token-\d+)", re.M)
RECEIVED_BY = re.compile(rb"\tby ([\w.-]+) \(relay\) with \w+ id ([0-9A-Z]{20})")


def host_config(tmp_path: Path, dsn: str, node: str, port: int, outbox_dir: Path) -> Path:
    config = tmp_path / f"{node}.toml"
    config.write_text(f"""
[server]
hostname = "{node}.test"
queue = "{dsn}"
node = "{node}"
lease_time = "2s"
workers = 1
[[smtp.listen]]
address = "127.0.0.1:{port}"
tls = "none"
[retry]
schedule = ["1s"]
bounces = false
[[upstream]]
name = "outbox"
type = "maildir"
path = "{outbox_dir}"
[web]
listen = "127.0.0.1:0"
""")
    return config


def delivered(outbox_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """token -> (receiving host, queue id) of every copy delivered."""
    copies: dict[str, list[tuple[str, str]]] = {}
    new = outbox_dir / "new"
    for path in new.iterdir() if new.exists() else []:
        data = path.read_bytes()
        token, received = TOKEN.search(data), RECEIVED_BY.search(data)
        assert token and received, data[:300]
        copies.setdefault(token.group(1).decode(), []).append(
            (received.group(1).decode(), received.group(2).decode())
        )
    return copies


async def send(port: int, token: str, *, timeout: float = 10) -> None:
    data = (
        f"From: <app@example.com>\r\nTo: <r@example.org>\r\nSubject: {token}\r\n"
        f"\r\n{'a cluster test body line ' * 4}\r\n"
    ).encode()
    await aiosmtplib.send(
        data,
        sender="app@example.com",
        recipients=["r@example.org"],
        hostname="127.0.0.1",
        port=port,
        timeout=timeout,
        start_tls=False,
    )


@pytest.fixture
async def hosts(pg_dsn: str, tmp_path: Path) -> AsyncIterator[tuple[list[RelayProcess], list[int]]]:
    ports = [free_port() for _ in range(HOSTS)]
    procs = [
        RelayProcess(host_config(tmp_path, pg_dsn, f"host-{i}", port, tmp_path / "outbox"))
        for i, port in enumerate(ports)
    ]
    await asyncio.gather(*(p.start() for p in procs))
    yield procs, ports
    for p in procs:
        await p.stop()


async def test_a_host_killed_mid_stream_loses_nothing(
    hosts: tuple[list[RelayProcess], list[int]], pg_dsn: str, tmp_path: Path
) -> None:
    procs, ports = hosts
    victim = 1
    acked: set[str] = set()
    enough = asyncio.Event()
    next_index = iter(range(MESSAGES))
    dead: set[int] = set()

    async def client(offset: int) -> None:
        for i in next_index:
            token = f"token-{i:04d}"
            for attempt in range(HOSTS):  # spread over the hosts; skip one that is gone
                host = (i + offset + attempt) % HOSTS
                if host in dead:
                    continue
                try:
                    await send(ports[host], token)
                except (aiosmtplib.SMTPException, OSError):
                    continue  # not acknowledged: the client may try another host
                acked.add(token)
                break
            if len(acked) >= KILL_AFTER_ACKS:
                enough.set()

    clients = [asyncio.create_task(client(n)) for n in range(CONCURRENCY)]
    await asyncio.wait_for(enough.wait(), 60)
    dead.add(victim)
    await procs[victim].kill()
    await asyncio.gather(*clients)
    assert len(acked) == MESSAGES  # every client found a live host

    # Across processes there is nothing to await but the files; bounded polling. The
    # victim's leases expire after 2 s and another host takes its work.
    async with asyncio.timeout(60):
        while not acked <= set(delivered(tmp_path / "outbox")):
            await asyncio.sleep(0.1)
    copies = delivered(tmp_path / "outbox")
    duplicated = {t: ids for t, ids in copies.items() if len(ids) > 1}
    client_retries = 0
    queue = PostgresQueue(pg_dsn, owner="test:0:0")
    await queue.connect()
    try:
        for token, copies_of in duplicated.items():
            ids = {queue_id for _, queue_id in copies_of}
            if len(ids) > 1:
                # Two submissions: the victim stored it, died before its 250 reached the
                # client, and the client sent it again elsewhere. Not a relay duplicate.
                assert f"host-{victim}.test" in {host for host, _ in copies_of}, token
                client_retries += 1
                continue
            # One queued message sent twice: only an attempt the dead host had in flight,
            # whose lease expired and which another host recovered and sent again.
            timeline = await queue.timeline(ids.pop())
            assert "recovered" in [e["type"] for e in timeline], timeline
        async with asyncio.timeout(30):  # a copy lands before its "sent" is committed
            while set(counts := await queue.counts()) != {"sent"}:
                await asyncio.sleep(0.1)
    finally:
        await queue.close()
    recovered_by_others = sum(
        "recovered" in line for i, p in enumerate(procs) if i != victim for line in p.log
    )
    print(
        f"\ncluster test: {len(acked)} acknowledged over {HOSTS} hosts, host-{victim} killed"
        f" after {KILL_AFTER_ACKS}; 0 lost, {len(duplicated) - client_retries} duplicate(s)"
        f" from recovered leases, {client_retries} resubmitted by clients after the kill, "
        f"recovery log lines on the others: {recovered_by_others}",
        file=sys.stderr,
    )
    assert counts.get("sent") == MESSAGES + client_retries and set(counts) == {"sent"}
    assert len(duplicated) <= 32  # at most the victim's in-flight attempts (concurrency)


async def test_database_stopped_under_load_gives_4xx_only_and_loses_nothing(
    private_postgres: PostgresCluster, make_relay: RelayFactory, tmp_path: Path
) -> None:
    dsn = await create_database(private_postgres.dsn)
    relay = await make_relay(server={"queue": dsn, "lease_time": "30s"})
    port = relay.smtp_ports()[0]
    acked: set[str] = set()
    codes: Counter[int] = Counter()
    down = asyncio.Event()
    codes_while_down: Counter[int] = Counter()
    no_reply: list[str] = []
    stop_clients = asyncio.Event()
    counter = iter(range(100_000))

    async def client() -> None:
        while not stop_clients.is_set():
            token = f"token-{next(counter):05d}"
            was_down = down.is_set()
            try:
                await send(port, token, timeout=30)
            except aiosmtplib.SMTPResponseException as exc:
                codes[exc.code] += 1
                if was_down and down.is_set():
                    codes_while_down[exc.code] += 1
                await asyncio.sleep(0.05)  # a client backs off after a 4xx
                continue
            except aiosmtplib.SMTPException as exc:  # no reply at all: the relay failed
                no_reply.append(repr(exc))
                continue
            acked.add(token)
            codes[250] += 1
            progress.set()

    async def until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not done():
                progress.clear()
                await progress.wait()

    progress = asyncio.Event()
    clients = [asyncio.create_task(client()) for _ in range(8)]
    await until(lambda: len(acked) >= 50)
    await asyncio.to_thread(private_postgres.stop, "fast")
    down.set()
    stopped_at = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{relay.web_port}/readyz") as resp,
    ):
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "not ready" and "unavailable" in body["problems"][0], body
    await asyncio.sleep(10)  # the outage itself: the point of this test is its length
    acked_during = {t for t in acked}
    down.clear()
    await asyncio.to_thread(private_postgres.start)
    outage = time.monotonic() - stopped_at
    await until(lambda: codes[250] >= len(acked_during) + 50)
    stop_clients.set()
    await asyncio.gather(*clients)
    # Dispatch resumed by itself: every acknowledged message reaches the outbox. (A few
    # more may: a commit the database made as it went down, whose client got a 451.)

    def tokens() -> Counter[str]:
        return Counter(
            m.group(1).decode() for data in outbox(relay) if (m := TOKEN.search(data)) is not None
        )

    async def all_delivered() -> bool:
        return acked <= set(tokens()) and set(await relay.queue.counts()) == {"sent"}

    await relay.wait_for(all_delivered, timeout=60)
    got = tokens()
    print(
        f"\noutage test: database down {outage:.1f}s, replies {dict(codes)}, while down"
        f" {dict(codes_while_down)}, {len(acked)} acknowledged, {len(acked - set(got))} lost",
        file=sys.stderr,
    )
    assert not acked - set(got)
    assert not no_reply
    assert codes_while_down and all(400 <= c < 500 for c in codes_while_down)
    assert all(c == 250 or 400 <= c < 500 for c in codes)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{relay.web_port}/readyz") as resp,
    ):
        assert resp.status == 200


# -- shared routing state, hosts in this process ---------------------------------------------


@pytest.fixture
async def providers() -> AsyncIterator[tuple[FakeMailgun, FakeSendGrid]]:
    mailgun, sendgrid = FakeMailgun(domain="mg.example.com"), FakeSendGrid()
    await mailgun.start()
    await sendgrid.start()
    yield mailgun, sendgrid
    await mailgun.stop()
    await sendgrid.stop()


async def start_hosts(
    make_relay: RelayFactory, dsn: str, n: int, **sections: object
) -> list[Relay]:
    return [
        await make_relay(server={"queue": dsn, "node": f"host-{i}"}, **sections) for i in range(n)
    ]


async def wait_cluster(relays: list[Relay], timeout: float = 30.0, **expected: int) -> None:
    """Until the shared queue has these counts: each host re-checks after its own rounds,
    and the host that finishes the last one sees it."""

    async def check() -> bool:
        counts = await relays[0].queue.counts()
        return all(counts.get(k, 0) == v for k, v in expected.items())

    waiters = [asyncio.create_task(r.wait_for(check, timeout)) for r in relays]
    done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()


async def smtp_to(relay: Relay, subject: str) -> None:
    await aiosmtplib.send(
        make_message(subject),
        sender="app@example.com",
        recipients=["rcpt@example.org"],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )


async def test_a_breaker_opened_by_one_host_is_open_for_all(
    make_relay: RelayFactory, pg_dsn: str, providers: tuple[FakeMailgun, FakeSendGrid]
) -> None:
    mailgun, sendgrid = providers
    upstreams = [
        {
            "name": "mailgun",
            "type": "mailgun",
            "api_key": FAKE_KEY,
            "base_url": mailgun.url,
            "domain": "mg.example.com",
            "priority": 1,
        },
        {
            "name": "sendgrid",
            "type": "sendgrid",
            "api_key": FAKE_KEY,
            "base_url": sendgrid.url,
            "priority": 2,
        },
    ]
    a, b = await start_hosts(
        make_relay,
        pg_dsn,
        2,
        upstream=upstreams,
        routing={"failures_to_open": 2, "cooldown": "1h"},
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": False},
    )
    mailgun.fail(429, times=None)  # throttled: counts towards failures_to_open
    for i in range(2):
        await smtp_to(a, f"via a {i}")
    await wait_cluster([a, b], sent=2)
    # Either host may have taken either message: if each saw one failure, neither would
    # open its breaker alone (failures_to_open = 2); the shared run of failures opens both.
    for host in (a, b, a):
        await host.router.sync()  # what the background sync does four times a second
    assert [h.router.state("mailgun").breaker.value for h in (a, b)] == ["open", "open"]
    assert b.router.state("mailgun").failures == 2  # the cluster's count, seen from b
    tried_before = mailgun.requests_seen
    for i in range(4):
        await smtp_to(b if i % 2 else a, f"after {i}")
    await wait_cluster([a, b], sent=6)
    assert mailgun.requests_seen == tried_before  # no host tried the open upstream again
    assert len(sendgrid.requests) == 6


async def test_max_rate_is_one_budget_for_the_cluster(
    make_relay: RelayFactory, pg_dsn: str, providers: tuple[FakeMailgun, FakeSendGrid]
) -> None:
    _, sendgrid = providers
    rate, per_host, n_hosts = 10, 10, 3
    relays = await start_hosts(
        make_relay,
        pg_dsn,
        n_hosts,
        upstream=[
            {
                "name": "sendgrid",
                "type": "sendgrid",
                "api_key": FAKE_KEY,
                "base_url": sendgrid.url,
                "max_rate": rate,
            },
        ],
        retry={"schedule": ["1h"], "max_age": "1d", "bounces": False},
    )
    await asyncio.gather(
        *(smtp_to(r, f"m{i}-{j}") for i, r in enumerate(relays) for j in range(per_host))
    )
    total = per_host * n_hosts
    await wait_cluster(relays, timeout=60, sent=total)
    arrivals = sorted(sendgrid.arrivals)
    spread = arrivals[-1] - arrivals[0]
    busiest = max(sum(1 for t in arrivals if s <= t < s + 1.0) for s in arrivals)
    print(
        f"\nshared max_rate {rate}/s over {n_hosts} hosts: {total} sends in {spread:.2f}s,"
        f" busiest second {busiest}",
        file=sys.stderr,
    )
    # One budget: a second's burst, then `rate` a second. Each host on its own budget
    # would have sent all 30 within the first second.
    assert spread >= (total - rate) / rate * 0.9
    assert busiest <= 2 * rate


async def test_the_same_notification_on_two_hosts_is_recorded_once(pg_dsn: str) -> None:
    from tests.queue.test_engines import new

    hosts = [PostgresQueue(pg_dsn, owner=f"host-{i}:1:1") for i in range(2)]
    for q in hosts:
        await q.start()
    try:
        results = await asyncio.gather(
            *(q.insert(new(dedupe="ses:the-same-mail")) for q in hosts for _ in range(3))
        )
        assert sorted(results) == [False] * 5 + [True]
    finally:
        for q in hosts:
            await q.close()
