"""Provider events under load: 10,000 signed webhook events at 50 connections while SMTP
traffic flows, posted the way each provider really posts them. Every event recorded once,
none lost, and what the posting costs the SMTP side.

    .venv/bin/python -m bench.events                         # every mode below (~12 min)
    .venv/bin/python -m bench.events --provider sendgrid --batch 100
    .venv/bin/python -m bench.events --provider mailgun
    .venv/bin/python -m bench.events --quick                 # 2,000 events, 1 run each (~1 min)

Modes (the default runs all three, one relay each, and reports one table per mode):
- SendGrid batched (`--batch N`, default 100): SendGrid's Event Webhook sends events in
  batches ("every 30 seconds or when the batch reaches 768 kilobytes"), one signed POST
  (ECDSA P-256 over timestamp + body) carrying many events of many messages.
- Mailgun: one event per POST, Mailgun's JSON webhook signed with HMAC-SHA256 over
  timestamp + token, a fresh token per POST; the relay takes each token once (a durable
  write per request), and its relay ids come back in the event's `user-variables`.
- SendGrid one event per POST (`--batch 1`): the worst case, kept as its own table.

1. A real `relay serve` (SQLite queue, the relay's default workers: one per CPU) whose one
   upstream is a fake provider in its own process (the tests' FakeSendGrid through
   bench/provider.py, or FakeMailgun through `bench.events fake-mailgun`) with
   `events = true` and the provider's verification key made here.
2. Prime: `--messages` messages (2,000), each to its own recipient, go in over SMTP and out
   to the fake; their relay ids come from the 250 replies and their provider ids from the
   queue (opened read-only by this process, as `relay queue` does).
3. Per run, `--events` fresh events (10,000: processed/accepted, delivered, deferred or
   temporary failures, soft bounces, unsubscribes and a few complaints; no hard bounces or
   drops, which would send reports or re-send mail and muddy the SMTP figure) over those
   messages, all signed before the clock starts. 5 % of the requests are posted again
   later, as a provider retries one it got no 2xx for: SendGrid's re-signed (answered 200,
   counted as duplicates), Mailgun's the same signed request (answered 401: a replayed
   token; counted apart, they are expected).
4. Runs alternate: smtp-source alone (5 KB, 20 sessions) and smtp-source with the events
   posted at 50 keep-alive connections (aiohttp) to POST /webhooks/provider; medians of 3.
   The SMTP count is sized by two runs with events beforehand (not reported) so the SMTP
   load ends before the posting does (the whole SMTP figure is taken under the event
   load); the report says the overlap.
5. After each run: every request answered as expected (200, or 401 for a replay), and per
   message the timeline holds exactly one provider event per distinct event posted so far
   (re-posts add none).

Everything listens on 127.0.0.1; every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import aiohttp
import aiosmtplib
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.perf import (
    HOST,
    PROVIDER_KEY,
    PROVIDER_KEY_VARIABLE,
    REPO_ROOT,
    UPSTREAM_CONCURRENCY,
    BenchError,
    Provider,
    RelayProcess,
    ensure_postfix,
    free_port,
    git_revision,
    host_busy_percent,
    http_upstream,
    log,
    port_open,
    smtp_source,
    tree_cpu_seconds,
    wait_until,
    write_report,
)

UPSTREAM = "provider"  # the upstream's name: the webhook path is /webhooks/provider
SENDGRID_KEY_VARIABLE = "BENCH_SENDGRID_EVENT_KEY"
MAILGUN_KEY_VARIABLE = "BENCH_MAILGUN_SIGNING_KEY"
MAILGUN_DOMAIN = "mg.example.com"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
CONNECTIONS = 50
RETRY_SHARE = 0.05
SMTP_SESSIONS = 20
SMTP_SIZE = 5_000
DEFAULT_BATCH = 100
SIZING_RUNS = 2  # runs with events that size the SMTP load, before the measured ones
# The events posted and their shares, by what they mean. No hard bounce (a report to the
# sender) and no drop (a re-send through another upstream): those add mail to the SMTP side.
EVENT_MIX: tuple[tuple[str, float], ...] = (
    ("processed", 0.30),
    ("delivered", 0.30),
    ("deferred", 0.22),
    ("soft_bounce", 0.12),
    ("unsubscribe", 0.04),
    ("complaint", 0.02),
)
# What each lands on the timeline as (relay.events.model.TIMELINE_TYPE).
PROVIDER_TIMELINE_TYPES = frozenset(
    {
        "processed",
        "delivered",
        "delayed",
        "bounced",
        "complained",
        "dropped",
        "rejected",
        "unsubscribed",
        "requeued",
    }
)
QUEUED_AS = re.compile(r"queued as (\S+)")

ProviderName = Literal["sendgrid", "mailgun"]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Mode:
    """One way events arrive: a provider, and how many events each of its POSTs carries."""

    provider: ProviderName
    batch: int
    worst_case: bool = False

    @property
    def label(self) -> str:
        if self.provider == "mailgun":
            return "Mailgun, one event per POST (HMAC, token taken once)"
        if self.batch == 1:
            kind = "the worst case" if self.worst_case else "one event per POST"
            return f"SendGrid, {kind}: one event per POST (ECDSA)"
        return f"SendGrid, batches of {self.batch} events per POST (ECDSA)"

    @property
    def slug(self) -> str:
        return "mailgun" if self.provider == "mailgun" else f"sendgrid-{self.batch}"


# -- the relay and its fake provider -----------------------------------------------------


def new_sendgrid_key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A P-256 key pair: the private half signs here, the public half (base64 of DER
    SubjectPublicKeyInfo, as SendGrid shows its verification key) goes to the relay."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


class FakeMailgunProcess(Provider):
    """`bench.events fake-mailgun PORT`: the tests' FakeMailgun in its own process (the
    same start, count and stop as bench/provider.py's fake SendGrid)."""

    def start(self) -> None:
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.events", "fake-mailgun", str(self.port)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, PROVIDER_KEY_VARIABLE: PROVIDER_KEY},
            )
        if not wait_until(lambda: port_open(self.port), timeout=30, interval=0.05):
            raise BenchError(f"the fake Mailgun did not start: {self.out_path.read_text()}")


def serve_fake_mailgun(argv: Sequence[str]) -> None:
    """The fake Mailgun's process: every send checked as Mailgun's messages.mime checks
    it, answered 200 with an id, counted at GET /count, not kept."""
    from aiohttp import web

    from tests.fakes.providers import FakeMailgun

    provider = FakeMailgun(api_key=os.environ[PROVIDER_KEY_VARIABLE], domain=MAILGUN_DOMAIN)
    provider.keep_requests = False

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=str(provider.accepted_count))

    app = provider.app()
    app.router.add_get("/count", count)
    web.run_app(app, host=HOST, port=int(argv[0]), access_log=None, print=None)


def mailgun_upstream(url: str) -> str:
    """The relay's upstream: the fake Mailgun at `url`."""
    return (
        f'[[upstream]]\nname = "{UPSTREAM}"\ntype = "mailgun"\nbase_url = "{url}"\n'
        f'domain = "{MAILGUN_DOMAIN}"\napi_key = "env:{PROVIDER_KEY_VARIABLE}"\n'
        f"max_concurrency = {UPSTREAM_CONCURRENCY}\n"
    )


class SampledRelay(RelayProcess):
    """The relay run under `sample-relay` (--profile): see "where the relay's time goes"."""

    def __init__(self, top: Path, *, samples: Path, **kwargs: Any) -> None:
        super().__init__(top, **kwargs)
        self.samples = samples

    def argv(self, *command: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.events",
            "sample-relay",
            str(self.samples),
            "--config",
            str(self.config),
            *command,
        ]


@contextlib.contextmanager
def relay_taking_events(
    top: Path,
    *,
    upstream: str,
    webhook: str,
    secret: tuple[str, str],
    workers: int | None,
    samples: Path | None = None,
) -> Iterator[tuple[RelayProcess, str]]:
    """A relay sending to `upstream` and taking its events (`webhook`: the upstream's
    verification settings, reading `secret` = (variable, value) from the environment) at a
    known web port; sampled into `samples` when given."""
    options: dict[str, Any] = {
        "upstream": upstream + f"events = true\nwebhook = {webhook}\n",
        "schedule": ["5s", "30s", "2m"],
        "log_level": "info",
        "workers": workers,
    }
    relay = (
        SampledRelay(top, samples=samples, **options)
        if samples is not None
        else RelayProcess(top, **options)
    )
    web_port = free_port()
    text = relay.config.read_text()
    placeholder = f'[web]\nlisten = "{HOST}:0"\n'
    if placeholder not in text:
        raise BenchError("bench.perf's relay config has no [web] listen line to set")
    relay.config.write_text(text.replace(placeholder, f'[web]\nlisten = "{HOST}:{web_port}"\n'))
    os.environ[secret[0]] = secret[1]  # RelayProcess passes the environment on
    relay.start()
    try:
        yield relay, f"http://{HOST}:{web_port}"
    finally:
        relay.stop()


# -- priming: messages the events are about ---------------------------------------------


async def prime(port: int, count: int, *, sessions: int = 20) -> dict[str, str]:
    """Send `count` 5 KB messages, each to its own recipient (spam reports suppress their
    address; smtp-source's recipient must stay deliverable). relay id → recipient."""
    body = "".join(f"line {i:04d} of a message the provider will report on\r\n" for i in range(90))
    sent: dict[str, str] = {}
    numbers = iter(range(count))

    async def session() -> None:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, start_tls=False, timeout=60)
        await client.connect()
        try:
            for n in numbers:
                rcpt = f"reader{n:05d}@example.net"
                message = (
                    f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: primed {n}\r\n\r\n{body}"
                ).encode()
                _, reply = await client.sendmail("app@example.com", [rcpt], message)
                found = QUEUED_AS.search(reply)
                if found is None:
                    raise BenchError(f"no queue id in the relay's reply {reply!r}")
                sent[found.group(1)] = rcpt
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException):
                await client.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))
    return sent


@dataclass(frozen=True)
class Primed:
    msg_id: str
    rcpt: str
    provider_id: str


async def provider_ids(config: Path, rcpts: dict[str, str], *, timeout: float) -> list[Primed]:
    """Wait (bounded) until every primed message is sent; their provider ids."""
    from relay import config as relay_config
    from relay.queue import open_queue

    cfg = relay_config.load(config, secrets=False)
    queue = open_queue(cfg, owner="bench:events")
    await queue.connect()
    try:
        deadline = time.monotonic() + timeout
        found: dict[str, str] = {}
        while True:
            for msg_id in rcpts.keys() - found.keys():
                row = await queue.get(msg_id)
                if row is not None and row.state == "sent" and row.meta.get("provider_id"):
                    found[msg_id] = str(row.meta["provider_id"])
            if len(found) == len(rcpts):
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{len(rcpts) - len(found)} of {len(rcpts)} primed messages not sent"
                    f" within {timeout:.0f}s"
                )
            await asyncio.sleep(0.5)
        return [Primed(m, rcpts[m], found[m]) for m in sorted(found)]
    finally:
        await queue.close()


async def recorded_events(config: Path, ids: Sequence[str]) -> tuple[Counter[str], Counter[str]]:
    """Per message, the provider events on its timeline; and their totals by type."""
    from relay import config as relay_config
    from relay.queue import open_queue

    cfg = relay_config.load(config, secrets=False)
    queue = open_queue(cfg, owner="bench:events")
    await queue.connect()
    per_message: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    try:
        for msg_id in ids:
            for entry in await queue.timeline(msg_id):
                kind = str(entry.get("type"))
                if kind in PROVIDER_TIMELINE_TYPES:
                    per_message[msg_id] += 1
                    by_type[kind] += 1
    finally:
        await queue.close()
    return per_message, by_type


# -- the events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedPost:
    body: bytes
    headers: dict[str, str]
    events: int  # how many events the body carries
    # The very request posted before (Mailgun's token already taken): answered 401.
    replay: bool = False


class Signer(Protocol):
    """A provider's side of the posting: its events' shape and how it signs a request."""

    def event(self, kind: str, primed: Primed, *, at: float, rng: random.Random) -> object: ...

    def post(self, events: Sequence[object]) -> SignedPost: ...

    def again(self, post: SignedPost) -> SignedPost:
        """The provider's retry of a request it got no 2xx for."""
        ...


class SendGridSigner:
    """SendGrid's Signed Event Webhook: a JSON array of events per POST, ECDSA P-256 /
    SHA-256 over the timestamp's text followed by the raw body, base64 of the DER
    signature. A retry is a new request, signed again."""

    _NAMES = {"soft_bounce": "bounce", "unsubscribe": "unsubscribe", "complaint": "spamreport"}

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key

    def event(self, kind: str, primed: Primed, *, at: float, rng: random.Random) -> object:
        """One event as SendGrid's Event Webhook sends it (custom_args flattened in)."""
        name = self._NAMES.get(kind, kind)
        stamp = int(at)
        event: dict[str, object] = {
            "email": primed.rcpt,
            "timestamp": stamp,
            "smtp-id": f"<{primed.provider_id}@ismtpd0001p1lon1.sendgrid.net>",
            "event": name,
            "category": ["bench"],
            "sg_event_id": secrets.token_urlsafe(16),
            "sg_message_id": f"{primed.provider_id}.filterdrecv-5bd6b6c-abcde-1-{stamp:X}-2.0",
            "relay_id": primed.msg_id,
        }
        if name == "processed":
            event["pool"] = {"name": "bench", "id": 1}
        elif name == "delivered":
            event["response"] = "250 2.0.0 OK  1700000000 a1-20020a05 - gsmtp"
            event["tls"] = 1
        elif name == "deferred":
            event["response"] = "421 4.7.0 Try again later, closing connection."
            event["attempt"] = str(rng.randint(1, 5))
        elif name == "bounce":
            event["type"] = "blocked"  # a soft bounce
            event["status"] = "4.7.1"
            event["reason"] = "421 4.7.1 Message temporarily deferred due to user complaints"
            event["bounce_classification"] = "Reputation"
        return event

    def post(self, events: Sequence[object]) -> SignedPost:
        body = json.dumps(list(events)).encode()
        return SignedPost(body, self._headers(body), len(events))

    def again(self, post: SignedPost) -> SignedPost:
        return SignedPost(post.body, self._headers(post.body), post.events)

    def _headers(self, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        signature = self.key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: base64.b64encode(signature).decode(),
            TIMESTAMP_HEADER: timestamp,
        }


class MailgunSigner:
    """Mailgun's JSON webhook: one event per POST, {"signature": {timestamp, token,
    signature}, "event-data": {...}}, the signature being hex HMAC-SHA256 (keyed with the
    HTTP webhook signing key) over timestamp + token, with a fresh random token per
    request. A retry here is the same signed request again, which the relay must refuse
    as a replay."""

    # kind → (event, severity, reason, SMTP code, message)
    _SHAPES: dict[str, tuple[str, str, str, int, str]] = {
        "processed": ("accepted", "", "", 0, ""),
        "delivered": ("delivered", "", "", 250, "OK"),
        "deferred": (
            "failed",
            "temporary",
            "generic",
            421,
            "4.7.0 Try again later, closing connection.",
        ),
        "soft_bounce": (
            "failed",
            "permanent",
            "old",
            421,
            "4.7.1 Message temporarily deferred due to user complaints",
        ),
        "unsubscribe": ("unsubscribed", "", "", 0, ""),
        "complaint": ("complained", "", "", 0, ""),
    }

    def __init__(self, signing_key: str) -> None:
        self.signing_key = signing_key.encode()

    def event(self, kind: str, primed: Primed, *, at: float, rng: random.Random) -> object:
        """One event-data object with the fields Mailgun's documented examples carry."""
        name, severity, reason, code, message = self._SHAPES[kind]
        data: dict[str, object] = {
            "id": secrets.token_urlsafe(16),
            "timestamp": at + rng.random(),
            "log-level": "info" if name != "failed" else "warn",
            "event": name,
            "recipient": primed.rcpt,
            "recipient-domain": primed.rcpt.rpartition("@")[2],
            "tags": ["bench"],
            "campaigns": [],
            "envelope": {
                "transport": "smtp",
                "sender": "app@example.com",
                "sending-ip": "209.61.154.250",
                "targets": primed.rcpt,
            },
            "flags": {"is-routed": False, "is-authenticated": True, "is-test-mode": False},
            "message": {
                "headers": {
                    "to": primed.rcpt,
                    "message-id": primed.provider_id,
                    "from": "app@example.com",
                    "subject": "primed",
                },
                "attachments": [],
                "size": 5_200,
            },
            "user-variables": {"relay_id": primed.msg_id},
        }
        if severity:
            data["severity"] = severity
            data["reason"] = reason
        if code:
            data["delivery-status"] = {
                "code": code,
                "message": message,
                "description": "",
                "attempt-no": rng.randint(1, 5),
                "session-seconds": 0.4,
                "tls": True,
            }
        return data

    def post(self, events: Sequence[object]) -> SignedPost:
        if len(events) != 1:
            raise BenchError("Mailgun posts one event per request: --batch applies to SendGrid")
        timestamp = str(int(time.time()))
        token = secrets.token_hex(25)
        digest = hmac.new(self.signing_key, (timestamp + token).encode(), hashlib.sha256)
        signature = {"timestamp": timestamp, "token": token, "signature": digest.hexdigest()}
        body = json.dumps({"signature": signature, "event-data": events[0]}).encode()
        return SignedPost(body, {"Content-Type": "application/json"}, 1)

    def again(self, post: SignedPost) -> SignedPost:
        return SignedPost(post.body, post.headers, post.events, replay=True)


def build_posts(
    primed: Sequence[Primed], count: int, *, batch: int, signer: Signer, rng: random.Random
) -> tuple[list[SignedPost], Counter[str]]:
    """`count` distinct events over the primed messages, shuffled, `batch` to a POST; then
    RETRY_SHARE of the POSTs again (the provider's retry), each after its original. Also
    the distinct events per message, which is what the timelines must gain."""
    kinds = [k for k, _ in EVENT_MIX]
    weights = [w for _, w in EVENT_MIX]
    now = time.time()
    targets = [primed[i % len(primed)] for i in range(count)]
    rng.shuffle(targets)
    expected: Counter[str] = Counter(t.msg_id for t in targets)
    events = [signer.event(rng.choices(kinds, weights)[0], t, at=now, rng=rng) for t in targets]
    posts = [signer.post(events[i : i + batch]) for i in range(0, count, batch)]
    retried = rng.sample(range(len(posts)), max(1, round(len(posts) * RETRY_SHARE)))
    for index in sorted(retried, reverse=True):
        posts.insert(rng.randint(index + 1, len(posts)), signer.again(posts[index]))
    return posts, expected


@dataclass
class PostResult:
    seconds: float
    latencies_ms: list[float]
    statuses: Counter[int]
    answers: Counter[str]  # the relay's recorded/duplicates/unmatched/requeued, summed
    events: int  # events carried by every request posted (re-posts included)
    replays: int  # identical requests posted twice (Mailgun's retries)
    replays_refused: int  # ... of which one of the two was answered 200, the other 401
    unexpected: int  # requests answered otherwise than 200 (or 401 for a replay)
    client_cpu: float  # seconds of this process's CPU while posting

    @property
    def post_rate(self) -> float:
        return len(self.latencies_ms) / self.seconds

    @property
    def event_rate(self) -> float:
        return self.events / self.seconds


async def post_all(url: str, posts: Sequence[SignedPost]) -> PostResult:
    """Each post in turn over CONNECTIONS keep-alive connections, as fast as answered."""
    target = f"{url}/webhooks/{UPSTREAM}"
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    answers: Counter[str] = Counter()
    pending = iter(posts)
    errors: list[str] = []
    # A request and its identical re-post race on two connections: whichever comes
    # second is the replay, so the pair is judged together: one 200 and one 401.
    replayed = {p.body for p in posts if p.replay}
    pair_statuses: dict[bytes, list[int]] = {body: [] for body in replayed}

    async def connection(http: aiohttp.ClientSession) -> None:
        for post in pending:
            started = time.perf_counter()
            async with http.post(target, data=post.body, headers=post.headers) as resp:
                text = await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[resp.status] += 1
            if resp.status == 200:
                answers.update({k: int(v) for k, v in json.loads(text).items() if k != "status"})
            if post.body in replayed:
                pair_statuses[post.body].append(resp.status)
            elif resp.status != 200:
                errors.append(f"{resp.status} {text[:300]!r}")

    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=120)
    cpu0 = _own_cpu()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        started = time.monotonic()
        await asyncio.gather(*(connection(http) for _ in range(CONNECTIONS)))
        seconds = time.monotonic() - started
    refused = sum(1 for got in pair_statuses.values() if sorted(got) == [200, 401])
    errors += [
        f"a request and its replay answered {sorted(got)}, not [200, 401]"
        for got in pair_statuses.values()
        if sorted(got) != [200, 401]
    ]
    for error in errors[:5]:
        log(f"  webhook post answered unexpectedly: {error}")
    return PostResult(
        seconds,
        latencies,
        statuses,
        answers,
        events=sum(p.events for p in posts),
        replays=len(replayed),
        replays_refused=refused,
        unexpected=len(errors),
        client_cpu=_own_cpu() - cpu0,
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- runs -------------------------------------------------------------------------------------


@dataclass
class Baseline:
    smtp_rate: float
    relay_cpu_percent: float


@dataclass
class Loaded:
    smtp_rate: float
    smtp_seconds: float
    relay_cpu_percent: float
    posts: PostResult
    missing: int  # messages whose timeline has fewer provider events than posted
    extra: int  # ... more (a duplicate recorded twice)
    recorded_total: int
    expected_total: int

    @property
    def all_ok(self) -> bool:
        return self.posts.unexpected == 0 and self.missing == 0 and self.extra == 0


def smtp_alone(relay: RelayProcess, count: int) -> Baseline:
    cpu0 = tree_cpu_seconds(relay.root_pid())
    seconds = smtp_source(
        relay.port, size=SMTP_SIZE, count=count, sessions=SMTP_SESSIONS, timeout=600
    )
    cpu = tree_cpu_seconds(relay.root_pid()) - cpu0
    return Baseline(count / seconds, 100 * cpu / seconds)


async def smtp_with_events(
    relay: RelayProcess, url: str, count: int, posts: Sequence[SignedPost]
) -> tuple[float, float, PostResult]:
    """smtp-source and the posting started together; SMTP's wall time, relay CPU % over
    it, and the posting's figures."""
    cpu0 = tree_cpu_seconds(relay.root_pid())
    smtp = asyncio.create_task(
        asyncio.to_thread(
            smtp_source,
            relay.port,
            size=SMTP_SIZE,
            count=count,
            sessions=SMTP_SESSIONS,
            timeout=600,
        )
    )
    await asyncio.sleep(0)  # the SMTP load's thread is off before the first post
    result = await post_all(url, posts)
    seconds = await smtp
    cpu = tree_cpu_seconds(relay.root_pid()) - cpu0
    return seconds, 100 * cpu / max(seconds, result.seconds), result


def drain(provider: Provider, total: int, *, timeout: float = 300) -> None:
    """Wait until the fake provider has every message sent so far: each run starts with an
    empty queue."""
    if not wait_until(lambda: provider.count() >= total, timeout=timeout, interval=0.2):
        raise BenchError(f"the provider got {provider.count()} of {total} messages in time")


@dataclass(frozen=True)
class Settings:
    modes: tuple[Mode, ...]
    runs: int
    messages: int
    events: int
    smtp_count: int  # 0: sized from the warm-up
    workers: int | None
    seed: int
    profile: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)
        batch = args.batch if args.batch is not None else DEFAULT_BATCH
        if batch < 1:
            raise BenchError(f"--batch {batch}: a POST carries at least one event")
        if args.provider == "mailgun" and args.batch not in (None, 1):
            raise BenchError("--batch is SendGrid's: Mailgun posts one event per request")
        modes: tuple[Mode, ...]
        if args.provider == "sendgrid":
            modes = (Mode("sendgrid", batch),)
        elif args.provider == "mailgun":
            modes = (Mode("mailgun", 1),)
        else:  # the default: the ways events really arrive, then the worst case
            modes = (Mode("sendgrid", batch), Mode("mailgun", 1))
            if batch != 1 and not args.no_worst_case:
                modes += (Mode("sendgrid", 1, worst_case=True),)
        return cls(
            modes=modes,
            runs=args.runs or (1 if quick else 3),
            messages=args.messages or (500 if quick else 2_000),
            events=args.events or (2_000 if quick else 10_000),
            smtp_count=args.count,
            workers=args.workers,
            seed=args.seed,
            profile=bool(args.profile),
        )


@dataclass
class ModeResult:
    mode: Mode
    smtp_count: int
    warm: PostResult  # the posting alone, before the runs
    cpu_per_event: float  # the relay's CPU seconds per event posted, in that posting
    baselines: list[Baseline] = field(default_factory=list)
    loaded: list[Loaded] = field(default_factory=list)
    by_type: Counter[str] = field(default_factory=Counter)
    profile: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ProviderSide:
    """What a mode's provider brings: its fake, the relay's upstream and webhook
    settings, and the signer of its posts."""

    fake: Provider
    upstream: str
    webhook: str
    secret: tuple[str, str]
    signer: Signer


def provider_side(mode: Mode, top: Path) -> ProviderSide:
    if mode.provider == "mailgun":
        fake: Provider = FakeMailgunProcess(top)
        signing_key = f"key-{secrets.token_hex(16)}"
        return ProviderSide(
            fake,
            mailgun_upstream(fake.url),
            f'{{ signing_key = "env:{MAILGUN_KEY_VARIABLE}" }}',
            (MAILGUN_KEY_VARIABLE, signing_key),
            MailgunSigner(signing_key),
        )
    fake = Provider(top)
    key, public_key = new_sendgrid_key()
    return ProviderSide(
        fake,
        http_upstream(fake.url),
        f'{{ public_key = "env:{SENDGRID_KEY_VARIABLE}" }}',
        (SENDGRID_KEY_VARIABLE, public_key),
        SendGridSigner(key),
    )


def run_mode(settings: Settings, mode: Mode, top: Path) -> ModeResult:
    """One mode: its own fake provider and relay, primed, warmed up, then the runs."""
    rng = random.Random(f"{settings.seed}:{mode.slug}")
    top.mkdir(parents=True)
    side = provider_side(mode, top)
    expected: Counter[str] = Counter()
    with contextlib.ExitStack() as stack:
        stack.callback(side.fake.stop)
        side.fake.start()
        relay, url = stack.enter_context(
            relay_taking_events(
                top / "relay",
                upstream=side.upstream,
                webhook=side.webhook,
                secret=side.secret,
                workers=settings.workers,
                samples=top if settings.profile else None,
            )
        )
        log(f"== {mode.label}")
        log(f"relay :{relay.port}, web {url}, fake {mode.provider} {side.fake.url}")
        log(f"priming: {settings.messages} messages, each to its own recipient")
        rcpts = asyncio.run(prime(relay.port, settings.messages))
        primed = asyncio.run(provider_ids(relay.config, rcpts, timeout=300))
        sent_total = settings.messages
        drain(side.fake, sent_total)

        # Warm-up, and the sizes: SMTP alone, then a posting alone (at least two POSTs per
        # connection, so batches are timed at full concurrency too).
        warm = smtp_alone(relay, 1_000)
        sent_total += 1_000
        drain(side.fake, sent_total)
        warm_events = min(
            settings.events, max(500, settings.events // 10, 2 * CONNECTIONS * mode.batch)
        )
        warm_posts, warm_expected = build_posts(
            primed, warm_events, batch=mode.batch, signer=side.signer, rng=rng
        )
        cpu0 = tree_cpu_seconds(relay.root_pid())
        warm_result = asyncio.run(post_all(url, warm_posts))
        cpu_per_event = (tree_cpu_seconds(relay.root_pid()) - cpu0) / warm_result.events
        expected.update(warm_expected)
        if warm_result.unexpected:
            raise BenchError(
                f"{warm_result.unexpected} warm-up posts answered unexpectedly:"
                f" {dict(warm_result.statuses)}"
            )
        # SMTP sized to end before the posting does, so the whole SMTP figure is taken
        # under event load. A first guess from the two rates alone; then SIZING_RUNS runs
        # of both at once (not reported), each resizing to 80 % of the SMTP rate it saw
        # times how long its posting took: the posting slows under SMTP load and SMTP
        # under the posting, by amounts that differ per mode (a batched posting barely
        # slows, the SMTP side halves).
        smtp_count = max(500, int(0.8 * warm.smtp_rate * settings.events / warm_result.event_rate))
        log(
            f"warm-up: SMTP alone {warm.smtp_rate:.0f} msg/s, events alone"
            f" {warm_result.event_rate:.0f}/s ({warm_result.post_rate:.0f} posts/s),"
            f" relay CPU {1000 * cpu_per_event:.2f} ms per event"
        )
        for n in range(0 if settings.smtp_count else SIZING_RUNS):
            trial = loaded_run(
                relay,
                url,
                smtp_count=smtp_count,
                events=settings.events,
                primed=primed,
                expected=expected,
                side=side,
                mode=mode,
                rng=rng,
                switch=top / "sizing",  # not sampled
            )
            log_loaded(f"sizing {n + 1}/{SIZING_RUNS}", trial)
            if not trial.all_ok:
                raise BenchError("events lost, doubled or refused in a sizing run: see above")
            sent_total += smtp_count
            drain(side.fake, sent_total)
            smtp_count = max(500, int(0.8 * trial.smtp_rate * trial.posts.seconds))
        smtp_count = settings.smtp_count or smtp_count
        result = ModeResult(mode, smtp_count, warm_result, cpu_per_event)
        log(f"SMTP load per run: {smtp_count} messages")

        for i in range(settings.runs):
            order = ("alone", "events") if i % 2 == 0 else ("events", "alone")
            for which in order:
                if which == "alone":
                    result.baselines.append(smtp_alone(relay, smtp_count))
                    log(
                        f"run {i + 1}/{settings.runs}: SMTP alone"
                        f" {result.baselines[-1].smtp_rate:.0f} msg/s"
                    )
                else:
                    result.loaded.append(
                        loaded_run(
                            relay,
                            url,
                            smtp_count=smtp_count,
                            events=settings.events,
                            primed=primed,
                            expected=expected,
                            side=side,
                            mode=mode,
                            rng=rng,
                            switch=top / SAMPLE_SWITCH,
                        )
                    )
                    log_loaded(f"run {i + 1}/{settings.runs}", result.loaded[-1])
                sent_total += smtp_count
                drain(side.fake, sent_total)
        _, result.by_type = asyncio.run(recorded_events(relay.config, list(rcpts)))
        relay.stop()
        if settings.profile:
            result.profile = sample_report(top)
    return result


def log_loaded(label: str, r: Loaded) -> None:
    log(
        f"{label}: SMTP with events {r.smtp_rate:.0f} msg/s ({r.smtp_seconds:.1f}s);"
        f" {len(r.posts.latencies_ms)} posts, {r.posts.events} events in"
        f" {r.posts.seconds:.1f}s ({r.posts.event_rate:.0f} events/s), statuses"
        f" {dict(r.posts.statuses)}; recorded {r.recorded_total} of {r.expected_total}"
        f" (messages short {r.missing}, over {r.extra})"
    )


def loaded_run(
    relay: RelayProcess,
    url: str,
    *,
    smtp_count: int,
    events: int,
    primed: Sequence[Primed],
    expected: Counter[str],
    side: ProviderSide,
    mode: Mode,
    rng: random.Random,
    switch: Path,
) -> Loaded:
    """A run with events: fresh events signed, then posted while SMTP flows (the sampler
    on while `switch` exists); afterwards every primed message's timeline is held against
    what was posted so far (`expected`, updated here)."""
    posts, run_expected = build_posts(primed, events, batch=mode.batch, signer=side.signer, rng=rng)
    expected.update(run_expected)
    switch.touch()
    try:
        seconds, cpu, result = asyncio.run(smtp_with_events(relay, url, smtp_count, posts))
    finally:
        switch.unlink()
    ids = [p.msg_id for p in primed]
    per_message, _ = asyncio.run(recorded_events(relay.config, ids))
    return Loaded(
        smtp_rate=smtp_count / seconds,
        smtp_seconds=seconds,
        relay_cpu_percent=cpu,
        posts=result,
        missing=sum(1 for m in ids if per_message[m] < expected[m]),
        extra=sum(1 for m in ids if per_message[m] > expected[m]),
        recorded_total=sum(per_message.values()),
        expected_total=sum(expected.values()),
    )


def run(settings: Settings) -> str:
    ensure_postfix()
    busy = host_busy_percent(2.0)
    if busy > 15:
        log(f"warning: the machine is already {busy:.0f} % busy: the figures will be noisy")
    results: list[ModeResult] = []
    with tempfile.TemporaryDirectory(prefix="relay-bench-events-") as tmp:
        for mode in settings.modes:
            results.append(run_mode(settings, mode, Path(tmp) / mode.slug))
    return report(settings, results, busy)


# -- where the relay's time goes (--profile) ---------------------------------------------
#
# py-spy is not installed and the workers are forked, so `python -m cProfile` of the
# supervisor sees none of their work. Instead the relay runs under `sample-relay`: each
# process (the forked workers included) gets a thread that looks at every thread's Python
# stack every few milliseconds while SAMPLE_SWITCH exists, and writes the counts out.

SAMPLE_SWITCH = "sampling"
SAMPLE_EVERY = 0.003
# Leaf frames that mean "waiting": the event loop (uvloop runs in C, so its idle leaf is
# asyncio's runner; the stdlib loop's is the selector), the supervisor, pool threads.
IDLE_LEAVES = frozenset(
    {
        "selectors.py:select",
        "runners.py:run",
        "supervisor.py:run",
        "thread.py:_worker",
        "threading.py:wait",
        "store.py:_write_loop",
    }
)


def _sampler(out: Path) -> None:
    import threading
    from collections import defaultdict

    switch = out / SAMPLE_SWITCH
    main_id = threading.main_thread().ident
    # "loop|..." for the event loop's thread, "threads|..." for the others:
    # "|samples|", "|idle|", "|self|<frame>" and "|inclusive|<frame>" (busy samples only).
    counts: defaultdict[str, int] = defaultdict(int)
    path = out / f"samples-{os.getpid()}.json"

    def name_of(frame: FrameType) -> str:
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"

    def loop() -> None:
        last_dump = time.monotonic()
        while True:
            time.sleep(SAMPLE_EVERY)
            if not switch.exists():
                time.sleep(0.1)
                continue
            for ident, frame in sys._current_frames().items():
                if ident == threading.get_ident():
                    continue
                kind = "loop" if ident == main_id else "threads"
                counts[f"{kind}|samples|"] += 1
                leaf = name_of(frame)
                if leaf in IDLE_LEAVES:
                    counts[f"{kind}|idle|"] += 1
                    continue
                counts[f"{kind}|self|{leaf}"] += 1
                seen: set[str] = set()
                walk: FrameType | None = frame
                while walk is not None:
                    name = name_of(walk)
                    if name not in seen:
                        seen.add(name)
                        counts[f"{kind}|inclusive|{name}"] += 1
                    walk = walk.f_back
            if time.monotonic() - last_dump > 1.0:
                path.write_text(json.dumps(counts))
                last_dump = time.monotonic()

    threading.Thread(target=loop, name="bench-sampler", daemon=True).start()


def sample_relay(argv: Sequence[str]) -> None:
    """`python -m bench.events sample-relay OUT RELAY-ARGS...`: the relay, sampled."""
    import runpy

    out = Path(argv[0])
    os.register_at_fork(after_in_child=lambda: _sampler(out))
    _sampler(out)
    sys.argv = ["relay", *argv[1:]]
    runpy.run_module("relay", run_name="__main__", alter_sys=True)


def sample_report(out: Path, *, top: int = 25) -> list[str]:
    """Per relay process: how busy its event loop was, the frames the busy samples were
    in (inclusive, without the start-up frames every sample has), and where busy pool
    threads were."""
    lines: list[str] = []
    for path in sorted(out.glob("samples-*.json")):
        counts: dict[str, int] = json.loads(path.read_text())
        samples = counts.get("loop|samples|", 0)
        busy = samples - counts.get("loop|idle|", 0)
        if not samples or not busy:
            continue
        lines += [
            "",
            f"Process {path.stem.split('-')[1]}: the event loop busy in"
            f" {100 * busy / samples:.0f} % of {samples} samples",
            "",
            "| frame (event loop, inclusive) | share of its busy samples |",
            "|---|---|",
        ]
        inclusive = sorted(
            (
                (n, k.split("|", 2)[2])
                for k, n in counts.items()
                if k.startswith("loop|inclusive|") and n < 0.995 * busy
            ),
            reverse=True,
        )
        lines += [f"| {name} | {100 * n / busy:.0f} % |" for n, name in inclusive[:top]]
        threads = sorted(
            ((n, k.split("|", 2)[2]) for k, n in counts.items() if k.startswith("threads|self|")),
            reverse=True,
        )
        if threads:
            lines += [
                "",
                "| frame (other threads when not idle, innermost) | samples |",
                "|---|---|",
            ]
            lines += [f"| {name} | {n} |" for n, name in threads[:8]]
    return lines


# -- report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """A mode's headline figures, shared by the summary and its own table."""

    alone: float
    under: float
    pairs: list[float]
    all_ok: bool

    @property
    def ratio(self) -> float:
        return self.under / self.alone

    @classmethod
    def of(cls, result: ModeResult) -> Figures:
        return cls(
            alone=statistics.median(b.smtp_rate for b in result.baselines),
            under=statistics.median(r.smtp_rate for r in result.loaded),
            # Each run with events against the run alone next to it (same moment).
            pairs=[
                r.smtp_rate / b.smtp_rate
                for r, b in zip(result.loaded, result.baselines, strict=False)
            ],
            all_ok=all(r.all_ok for r in result.loaded),
        )


def report(settings: Settings, results: Sequence[ModeResult], busy: float) -> str:
    lines = [
        f"# Provider events under SMTP load, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"relay {git_revision()} · {os.cpu_count()} cores, {busy:.0f} % busy before the"
        " start · relay workers:"
        f" {settings.workers if settings.workers is not None else 'default (one per CPU)'} ·"
        f" {settings.events:,} events per run over {settings.messages:,} messages,"
        f" +{RETRY_SHARE:.0%} of the requests re-posted · {CONNECTIONS} connections ·"
        f" SMTP {SMTP_SIZE // 1000} KB, {SMTP_SESSIONS} sessions · medians of"
        f" {settings.runs}, alternating",
        "",
        "| mode | SMTP alone | SMTP with events | ratio | per run | events/s with SMTP"
        " (alone) | relay CPU per event | POST p50 / p95 | every event once |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        f = Figures.of(result)
        latencies = [ms for r in result.loaded for ms in r.posts.latencies_ms]
        lines.append(
            f"| {result.mode.label} | {f.alone:.0f} msg/s | {f.under:.0f} msg/s |"
            f" **{f.ratio:.2f}** ({'meets' if f.ratio >= 0.90 else 'misses'} 0.90) |"
            f" {', '.join(f'{p:.2f}' for p in f.pairs)} |"
            f" {statistics.median(r.posts.event_rate for r in result.loaded):.0f}"
            f" ({result.warm.event_rate:.0f}) |"
            f" {1000 * result.cpu_per_event:.2f} ms |"
            f" {statistics.median(latencies):.1f} / {pct(latencies, 0.95):.1f} ms |"
            f" {'yes' if f.all_ok else '**NO**'} |"
        )
    for result in results:
        lines += ["", *mode_table(result)]
        if result.profile:
            lines += ["", f"### Where the relay's time goes: {result.mode.label} (sampled)"]
            lines += result.profile
    return "\n".join(lines) + "\n"


def mode_table(result: ModeResult) -> list[str]:
    f = Figures.of(result)
    loaded = result.loaded
    latencies = [ms for r in loaded for ms in r.posts.latencies_ms]
    posted = sum(len(r.posts.latencies_ms) for r in loaded)
    replays = sum(r.posts.replays_refused for r in loaded)
    statuses: Counter[int] = Counter()
    answers: Counter[str] = Counter()
    for r in loaded:
        statuses.update(r.posts.statuses)
        answers.update(r.posts.answers)
    last = loaded[-1]
    overlap = statistics.median(min(1.0, r.posts.seconds / r.smtp_seconds) for r in loaded)
    mailgun = result.mode.provider == "mailgun"
    lines = [
        f"## {result.mode.label}",
        "",
        f"SMTP load per run: {result.smtp_count:,} messages",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| SMTP accepted, alone | {f.alone:.0f} msg/s | |",
        f"| SMTP accepted, events posted meanwhile | {f.under:.0f} msg/s | |",
        f"| ratio of the medians | **{f.ratio:.2f}** | ≥ 0.90 |",
        f"| ratio per run (with events ÷ the alone run beside it) |"
        f" {', '.join(f'{p:.2f}' for p in f.pairs)} | |",
        f"| events taken while SMTP runs |"
        f" {statistics.median(r.posts.event_rate for r in loaded):.0f} events/s in"
        f" {statistics.median(r.posts.post_rate for r in loaded):.0f} POSTs/s (alone, warm-up:"
        f" {result.warm.event_rate:.0f} events/s) | |",
        f"| relay CPU per event, events posted alone (warm-up) |"
        f" {1000 * result.cpu_per_event:.2f} ms | |",
        f"| webhook POST latency p50 / p95 | {statistics.median(latencies):.1f} /"
        f" {pct(latencies, 0.95):.1f} ms | |",
        f"| POSTs answered | {posted:,}: "
        + ", ".join(f"{status}: {n:,}" for status, n in sorted(statuses.items()))
        + f" | {'200, and 401 for each replay' if mailgun else 'all 200'} |",
    ]
    if mailgun:
        lines.append(
            f"| replays (the same signed request again), judged with their original |"
            f" {replays:,} of {sum(r.posts.replays for r in loaded):,} refused 401, the"
            " other of the pair 200 | every one |"
        )
    lines += [
        f"| requests answered otherwise than expected | {sum(r.posts.unexpected for r in loaded)}"
        " | 0 |",
        f"| relay's answers: recorded / duplicates / unmatched / requeued |"
        f" {answers['recorded']:,} / {answers['duplicates']:,} / {answers['unmatched']:,} /"
        f" {answers['requeued']:,} |"
        f" distinct / {'0 (replays refused)' if mailgun else 're-posted events'} / 0 / 0 |",
        f"| provider events on the timelines (warm-up included) | {last.recorded_total:,} of"
        f" {last.expected_total:,} posted | equal |",
        f"| messages with an event missing / recorded twice | {sum(r.missing for r in loaded)}"
        f" / {sum(r.extra for r in loaded)} | 0 / 0 |",
        f"| share of the SMTP load overlapped by the posting | {overlap:.0%} | 100 % |",
        f"| relay CPU (% of one core), SMTP alone / with events |"
        f" {statistics.median(b.relay_cpu_percent for b in result.baselines):.0f} /"
        f" {statistics.median(r.relay_cpu_percent for r in loaded):.0f} | |",
        f"| the posting client's CPU per run | "
        f"{statistics.median(r.posts.client_cpu for r in loaded):.1f} s | |",
        "",
        "Timeline events by type: "
        + ", ".join(f"{kind} {n:,}" for kind, n in sorted(result.by_type.items())),
        "",
        f"Verdict: {'all recorded once, none lost' if f.all_ok else 'EVENTS LOST OR DOUBLED'};"
        f" SMTP ratio {f.ratio:.2f} ({'meets' if f.ratio >= 0.90 else 'misses'} 0.90).",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["sample-relay"]:
        sample_relay(given[1:])
        return 0
    if given[:1] == ["fake-mailgun"]:
        serve_fake_mailgun(given[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--provider",
        choices=("sendgrid", "mailgun"),
        default=None,
        help="one mode only (default: SendGrid batched, Mailgun, then SendGrid --batch 1)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"SendGrid events per POST (default {DEFAULT_BATCH}; 1 is the worst case)",
    )
    parser.add_argument(
        "--no-worst-case",
        action="store_true",
        help="in the default run, leave out SendGrid with one event per POST",
    )
    parser.add_argument("--quick", action="store_true", help="2,000 events, one run each")
    parser.add_argument("--runs", type=int, default=0, help="runs of each kind (default 3)")
    parser.add_argument("--messages", type=int, default=0, help="primed messages (2,000)")
    parser.add_argument("--events", type=int, default=0, help="events per run (10,000)")
    parser.add_argument("--count", type=int, default=0, help="SMTP messages per run (sized)")
    parser.add_argument(
        "--workers", type=int, default=None, help="the relay's server.workers (default: unset)"
    )
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the relay's Python stacks during the runs with events; adds the"
        " busiest frames of each process to the report",
    )
    args = parser.parse_args(given)
    started = time.monotonic()
    try:
        text = run(Settings.from_args(args))
    except BenchError as exc:
        print(f"bench.events: {exc}", file=sys.stderr)
        return 1
    write_report("events", text, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
