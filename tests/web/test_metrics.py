"""GET /metrics: Prometheus text after known traffic, parsed with prometheus_client's own
parser; who may read it; and a `relay serve` with two workers counted in one scrape."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.app import Relay
from relay.queue.admin import QueueAdmin
from relay.telemetry.multiprocess import PREFIX
from relay.telemetry.stats import upstream_windows, window_stats
from relay.web.metrics import is_loopback
from tests.conftest import PASSWORD, USER, RelayFactory, mailgun_upstream, make_message, wait_states
from tests.fakes.providers import FakeMailgun
from tests.fakes.relay_process import RelayProcess, free_port
from tests.web.conftest import TOKENS, base_url, bearer, token_entries

LISTENER = "127.0.0.1:0"  # the configured address is the listener label
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled counter never incremented (not exported)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics", headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def upstreams(mailgun: FakeMailgun, tmp_path: Path) -> list[dict[str, Any]]:
    """A provider first (the failing one in these tests), the maildir outbox after it."""
    return [
        mailgun_upstream(mailgun, timeout="30s"),
        {"name": "outbox", "type": "maildir", "path": str(tmp_path / "outbox"), "priority": 2},
    ]


async def send(relay: Relay, ctx: ssl.SSLContext, subject: str, **login: str) -> None:
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp_ports()[0], start_tls=True, tls_context=ctx
    ) as client:
        await client.login(login.get("user", USER), login.get("password", PASSWORD))
        await client.sendmail("app@example.com", ["rcpt@example.org"], make_message(subject))


def smtplib_wrong_password_then_refused_sender(port: int, ctx: ssl.SSLContext) -> None:
    """One session: a failed AUTH, a good one, then a sender the user may not use."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.user, client.password = USER, "wrong-password"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("PLAIN", client.auth_plain)  # one mechanism: login() tries each
        client.login(USER, PASSWORD)
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("someone@elsewhere.example", ["rcpt@example.org"], b"x\r\n")


async def test_metrics_count_sessions_auth_failures_messages_and_attempts(
    make_relay: RelayFactory, mailgun: FakeMailgun, tmp_path: Path, client_tls: ssl.SSLContext
) -> None:
    relay = await make_relay(
        upstream=upstreams(mailgun, tmp_path),
        routing={"failures_to_open": 100},
        web={"listen": "127.0.0.1:0", "tokens": token_entries(tmp_path)},
    )
    # Two messages: mailgun answers 503 (transient), each fails over to the outbox.
    mailgun.fail(503, times=2)
    for i in range(2):
        await send(relay, client_tls, f"failover {i}")
    await wait_states(relay, sent=2)
    # One more: mailgun refuses it for good (400), it fails (bounces are off here).
    mailgun.fail(400, times=1)
    await send(relay, client_tls, "refused")
    await wait_states(relay, sent=2, failed=1)
    port = relay.smtp_ports()[0]
    await asyncio.to_thread(smtplib_wrong_password_then_refused_sender, port, client_tls)

    status, content_type, text = await scrape(base_url(relay))
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    m = parse(text)
    assert value(m, "relay_smtp_sessions_total", listener=LISTENER) == 4
    assert value(m, "relay_smtp_auth_failures_total", listener=LISTENER) == 1
    received = "relay_messages_received_total"
    assert value(m, received, listener=LISTENER, result="accepted") == 3
    assert value(m, received, listener=LISTENER, result="refused_policy") == 1
    attempts = "relay_delivery_attempts_total"
    assert value(m, attempts, upstream="mailgun", outcome="transient") == 2
    assert value(m, attempts, upstream="mailgun", outcome="permanent") == 1
    assert value(m, attempts, upstream="outbox", outcome="accepted") == 2
    assert value(m, attempts, upstream="outbox", outcome="transient") == 0
    finished = "relay_messages_finished_total"
    assert value(m, finished, kind="outbound", state="sent") == 2
    assert value(m, finished, kind="outbound", state="failed") == 1
    assert value(m, "relay_messages_deferred_total", kind="outbound") == 0
    assert value(m, "relay_delivery_duration_seconds_count", upstream="mailgun") == 3
    assert value(m, "relay_delivery_duration_seconds_count", upstream="outbox") == 2
    assert value(m, "relay_queue_time_seconds_count", kind="outbound") == 3
    assert value(m, "relay_queue_time_seconds_bucket", kind="outbound", le="+Inf") == 3
    # Gauges from the queue and the shared routing state.
    assert value(m, "relay_queue_messages", state="sent") == 2
    assert value(m, "relay_queue_messages", state="failed") == 1
    assert value(m, "relay_queue_messages", state="queued") == 0
    assert value(m, "relay_queue_oldest_message_age_seconds") == 0
    await relay.router.sync()
    m = parse((await scrape(base_url(relay)))[2])
    assert value(m, "relay_upstream_health", upstream="mailgun") < 1.0
    assert value(m, "relay_upstream_health", upstream="outbox") == 1.0
    for name in ("mailgun", "outbox"):
        assert value(m, "relay_upstream_breaker_state", upstream=name) == 0
        assert value(m, "relay_upstream_paused", upstream=name) == 0
        assert value(m, "relay_upstream_in_flight", upstream=name) == 0

    # The same traffic in the shared per-minute stats that the page and the API read.
    await relay.telemetry.rollup.flush()
    now = time.time()
    figures = (await window_stats(relay.queue.stats, window=3600, now=now)).as_dict()
    totals = {k: sum(s[k] for s in figures["series"]) for k in ("received", "sent", "failed")}
    assert totals == {"received": 3, "sent": 2, "failed": 1}
    assert figures["upstreams"]["mailgun"]["attempts"] == 3
    assert figures["upstreams"]["mailgun"]["success_rate"] == 0.0
    assert figures["upstreams"]["outbox"]["successes"] == 2
    assert figures["queue_time"]["max"] is not None
    windows = await upstream_windows(relay.queue.stats, now=now)
    assert windows["outbox"]["5m"]["success_rate"] == 1.0
    assert windows["mailgun"]["1h"]["failures"] == 3


async def test_open_breaker_and_pause_show_in_the_gauges(
    make_relay: RelayFactory, mailgun: FakeMailgun, tmp_path: Path, client_tls: ssl.SSLContext
) -> None:
    relay = await make_relay(
        upstream=upstreams(mailgun, tmp_path),
        routing={"failures_to_open": 1, "cooldown": "1h"},
    )
    mailgun.fail(503, times=None)
    await send(relay, client_tls, "opens the breaker")
    await wait_states(relay, sent=1)
    await relay.router.sync()  # what the background sync does every quarter second
    await QueueAdmin(relay.queue).upstream_action("outbox", "pause", actor="test", cooldown=0)
    m = parse((await scrape(base_url(relay)))[2])
    assert value(m, "relay_upstream_breaker_state", upstream="mailgun") == 2
    assert value(m, "relay_upstream_paused", upstream="outbox") == 1
    assert value(m, "relay_upstream_paused", upstream="mailgun") == 0


async def test_two_relays_in_one_process_count_apart(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    """Each in-process relay has its own registry: nothing is shared or registered twice."""
    a = await make_relay()
    b = await make_relay(server={"queue": str(tmp_path / "queue-b")})
    port = a.smtp_ports()[0]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        await client.noop()
    ma, mb = [parse((await scrape(base_url(r)))[2]) for r in (a, b)]
    assert value(ma, "relay_smtp_sessions_total", listener=LISTENER) == 1
    assert value(mb, "relay_smtp_sessions_total", listener=LISTENER) == 0


# -- access -----------------------------------------------------------------------------------


async def test_loopback_clients_scrape_without_a_token_by_default(web_relay: Relay) -> None:
    status, _, text = await scrape(base_url(web_relay))
    assert status == 200 and "relay_queue_messages" in text


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.10", False),
        ("2001:db8::1", False),
        ("::ffff:192.0.2.10", False),
        (None, False),
        ("not an address", False),
    ],
)
def test_which_clients_count_as_loopback(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback


async def test_token_mode_needs_a_read_or_admin_token(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay(
        web={"listen": "127.0.0.1:0", "tokens": token_entries(tmp_path), "metrics": "token"}
    )
    url = base_url(relay)
    status, _, body = await scrape(url)
    assert status == 401 and "Bearer" in body
    assert (await scrape(url, {"Authorization": "Bearer not-a-token-at-all"}))[0] == 401
    assert (await scrape(url, bearer("app")))[0] == 403  # submit role
    for name in ("viewer", "ops"):
        status, content_type, text = await scrape(url, bearer(name))
        assert status == 200 and content_type.startswith("text/plain"), name
        assert "relay_smtp_sessions_total" in text or "relay_queue_messages" in text


async def test_token_mode_without_tokens_says_how_to_add_one(make_relay: RelayFactory) -> None:
    relay = await make_relay(web={"listen": "127.0.0.1:0", "metrics": "token"})
    status, _, body = await scrape(base_url(relay))
    assert status == 403 and "relay token new" in body


async def test_open_mode_needs_nothing(make_relay: RelayFactory) -> None:
    relay = await make_relay(web={"listen": "127.0.0.1:0", "metrics": "open"})
    assert (await scrape(base_url(relay)))[0] == 200


async def test_openmetrics_is_served_when_asked_for(web_relay: Relay) -> None:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    status, content_type, text = await scrape(base_url(web_relay), accept)
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert TOKENS  # the fixture's tokens do not matter to a loopback scrape


# -- `relay serve` with two workers ------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Poll a relay in another process (it has no event to await from here)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def metrics_dirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{PREFIX}{pid}-*"))


async def test_two_workers_are_counted_in_one_scrape(tmp_path: Path) -> None:
    smtp_port, web_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
hostname = "relay.test"
queue = "{tmp_path / "queue"}"
min_free_disk = 0
workers = 2
[[smtp.listen]]
address = "127.0.0.1:{smtp_port}"
tls = "none"
[retry]
bounces = false
[[upstream]]
name = "outbox"
type = "maildir"
path = "{tmp_path / "outbox"}"
[web]
listen = "127.0.0.1:{web_port}"
""")
    proc = RelayProcess(config)
    await proc.start()
    try:
        assert proc.proc is not None
        [values_dir] = metrics_dirs(proc.proc.pid)
        assert values_dir.stat().st_mode & 0o777 == 0o700
        # The kernel spreads connections over both workers (SO_REUSEPORT); with 40
        # sessions the chance that one worker got them all is 2**-39.
        sessions = 40

        async def one(i: int) -> None:
            await aiosmtplib.send(
                make_message(f"m{i}"),
                sender="app@example.com",
                recipients=["rcpt@example.org"],
                hostname="127.0.0.1",
                port=smtp_port,
            )

        await asyncio.gather(*(one(i) for i in range(sessions)))
        url = f"http://127.0.0.1:{web_port}"
        samples: Samples = {}

        async def all_sent() -> bool:
            nonlocal samples
            samples = parse((await scrape(url))[2])
            # The gauges are read from the queue just before the counters are collected:
            # wait for a scrape where both have seen every message.
            finished = "relay_messages_finished_total"
            return (
                value(samples, finished, kind="outbound", state="sent") == sessions
                and value(samples, "relay_queue_messages", state="sent") == sessions
            )

        await until(all_sent)
        listener = f"127.0.0.1:{smtp_port}"
        assert value(samples, "relay_smtp_sessions_total", listener=listener) == sessions
        received = value(
            samples, "relay_messages_received_total", listener=listener, result="accepted"
        )
        assert received == sessions
        assert (
            value(samples, "relay_delivery_attempts_total", upstream="outbox", outcome="accepted")
            == sessions
        )
        # Both workers wrote values: one file of counters per process.
        assert len(list(values_dir.glob("counter_*.db"))) == 2
        # And both flushed their per-minute stats to the host's shared store.
        stats_total = 0

        async def stats_flushed() -> bool:
            nonlocal stats_total
            from relay.config import load
            from relay.queue import open_queue

            queue = open_queue(load(config), owner="test")
            try:
                figures = await window_stats(queue.stats, window=3600, now=time.time())
            finally:
                await queue.close()
            stats_total = sum(s["sent"] for s in figures.series)
            return stats_total == sessions

        await until(stats_flushed, timeout=15)
    finally:
        await proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0
    assert metrics_dirs(proc.proc.pid) == []  # removed at exit


async def test_messages_submitted_over_http_are_counted_like_smtp_ones(web_relay: Relay) -> None:
    url = base_url(web_relay)
    good = {"from": "app@example.com", "to": ["r@example.org"], "subject": "s", "text": "x"}
    async with aiohttp.ClientSession() as http:
        for payload, key in ((good, "k1"), (good, "k1"), ({**good, "to": ["not an address"]}, "")):
            headers = {**bearer("app"), **({"Idempotency-Key": key} if key else {})}
            async with http.post(f"{url}/api/v1/messages", json=payload, headers=headers) as r:
                assert r.status in (200, 202, 400), await r.text()
    _, _, text = await scrape(url)
    samples = parse(text)
    name = "relay_messages_received_total"
    # The repeated idempotent request is the same message: counted once.
    assert value(samples, name, listener="api", result="accepted") == 1
    assert value(samples, name, listener="api", result="refused_address") == 1
