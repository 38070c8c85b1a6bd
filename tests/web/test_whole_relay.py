"""The web side shows the whole relay: every worker process, and every host of a cluster.

Only worker 0 (or one host) serves the API, but mail arrives at whichever process the
kernel hands a connection to, and each process attempts the work it holds. What the API
shows must come from state every process writes (the queue, its shared routing state),
not from the serving process's memory.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from tests.fakes.postgres import create_database
from tests.fakes.relay_process import RelayProcess, free_port
from tests.web.conftest import TOKENS, bearer

MESSAGES = 24


def config(
    tmp_path: Path,
    name: str,
    *,
    queue: str,
    smtp_port: int,
    web_port: int,
    down_port: int,
    workers: int,
) -> Path:
    """A relay whose one upstream (an SMTP smarthost on `down_port`) refuses connections,
    so every attempt fails and the breaker opens after two."""
    token_file = tmp_path / "ops.token"
    token_file.write_text(TOKENS["ops"][1])
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[server]
hostname = "{name}.test"
queue = "{queue}"
node = "{name}"
workers = {workers}
min_free_disk = 0
[[smtp.listen]]
address = "127.0.0.1:{smtp_port}"
tls = "none"
[retry]
schedule = ["1h"]
bounces = false
[routing]
failures_to_open = 2
cooldown = "1h"
[[upstream]]
name = "smarthost"
type = "smtp"
host = "127.0.0.1"
port = {down_port}
tls = "none"
[web]
listen = "127.0.0.1:{web_port}"
[[web.tokens]]
name = "ops"
token = "file:{token_file}"
role = "admin"
""")
    return path


async def send(port: int, n: int) -> None:
    """Each message on its own connection, so the kernel spreads them over the workers."""
    message = f"From: <app@example.com>\r\nTo: <r@example.org>\r\nSubject: whole {n}\r\n\r\nx\r\n"
    await aiosmtplib.send(
        message.encode(),
        sender="app@example.com",
        recipients=["r@example.org"],
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
    )


async def api(http: aiohttp.ClientSession, web_port: int, path: str) -> Any:
    async with http.get(f"http://127.0.0.1:{web_port}/api/v1{path}", headers=bearer("ops")) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def wait_api(
    http: aiohttp.ClientSession, web_port: int, path: str, check: Any, timeout: float = 30
) -> Any:
    """Poll the API until `check(body)` holds: the state arrives by the processes' own
    syncs, which the test cannot await."""
    async with asyncio.timeout(timeout):
        while True:
            body = await api(http, web_port, path)
            if check(body):
                return body
            await asyncio.sleep(0.2)


def attempts_in(body: dict[str, Any]) -> int:
    return sum(1 for e in body["events"] if e["type"] == "attempt")


async def test_two_workers_one_view_of_messages_and_breakers(tmp_path: Path) -> None:
    smtp_port, web_port = free_port(), free_port()
    queue_dir = tmp_path / "queue"
    proc = RelayProcess(
        config(
            tmp_path,
            "solo",
            queue=str(queue_dir),
            smtp_port=smtp_port,
            web_port=web_port,
            down_port=free_port(),
            workers=2,
        )
    )
    await proc.start()
    try:
        for n in range(MESSAGES):
            await send(smtp_port, n)
        # Both workers took some of the mail: it is in both shards.
        per_shard = {}
        for path in sorted(queue_dir.glob("queue*.db")):
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                per_shard[path.name] = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        assert sum(per_shard.values()) == MESSAGES and all(per_shard.values()), per_shard
        async with aiohttp.ClientSession() as http:
            page = await api(http, web_port, f"/messages?limit={MESSAGES}")
            subjects = {m["subject"] for m in page["messages"]}
            assert subjects == {f"whole {n}" for n in range(MESSAGES)}
            # Every attempt of either worker counts in the one upstream row, and the
            # breaker they opened together shows open.
            rows = await wait_api(
                http, web_port, "/upstreams", lambda b: b["upstreams"][0]["breaker"] == "open"
            )
            events = [
                await api(http, web_port, f"/messages/{m['id']}/events") for m in page["messages"]
            ]
            made = sum(attempts_in(e) for e in events)
            rows = await wait_api(
                http,
                web_port,
                "/upstreams",
                lambda b: b["upstreams"][0]["attempts"] == made,
            )
            assert rows["upstreams"][0]["failures"] == made >= 2
            counts = await api(http, web_port, "/stats?window=1h")
            assert sum(counts["counts"].values()) == MESSAGES
    finally:
        await proc.stop()


@pytest.mark.timeout(180)
async def test_every_host_of_a_cluster_shows_the_same_relay(tmp_path: Path, postgres: str) -> None:
    dsn = await create_database(postgres)
    down = free_port()
    hosts = []
    for name in ("alpha", "beta"):
        smtp_port, web_port = free_port(), free_port()
        hosts.append(
            (
                RelayProcess(
                    config(
                        tmp_path,
                        name,
                        queue=dsn,
                        smtp_port=smtp_port,
                        web_port=web_port,
                        down_port=down,
                        workers=1,
                    )
                ),
                smtp_port,
                web_port,
            )
        )
    for proc, _, _ in hosts:
        await proc.start()
    try:
        (_, alpha_smtp, alpha_web), (_, _, beta_web) = hosts
        for n in range(4):
            await send(alpha_smtp, n)  # only alpha receives and attempts
        async with aiohttp.ClientSession() as http:
            # The breaker alpha opened, and the failures that opened it (counters arrive
            # with alpha's next sync, the breaker at once), as beta sees them.
            await wait_api(
                http,
                beta_web,
                "/upstreams",
                lambda b: (
                    # (a refused connection opens it at once: one failure, or two when
                    # the second message was already on its way)
                    b["upstreams"][0]["breaker"] == "open" and b["upstreams"][0]["failures"] >= 1
                ),
            )
            on_beta = await api(http, beta_web, "/messages")
            on_alpha = await api(http, alpha_web, "/messages")
            # The same messages (a state may move between the two reads: alpha's
            # dispatcher defers the last one while they are made).
            assert [m["id"] for m in on_beta["messages"]] == [m["id"] for m in on_alpha["messages"]]
            assert len(on_beta["messages"]) == 4
    finally:
        for proc, _, _ in hosts:
            await proc.stop()
