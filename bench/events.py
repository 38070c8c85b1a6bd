"""Provider events under load: 10,000 signed SendGrid webhook posts at 50 connections
while SMTP traffic flows. Every event recorded once, none lost, and what the posting costs
the SMTP side.

    .venv/bin/python -m bench.events            # full run (~3 minutes)
    .venv/bin/python -m bench.events --quick    # 2,000 events, one run each (~20 s)

1. A real `relay serve` (SQLite queue, the relay's default workers: one per CPU) whose one
   upstream is a fake SendGrid (bench/provider.py, the tests' FakeSendGrid in its own
   process) with `events = true` and the public half of an ECDSA P-256 key made here.
2. Prime: `--messages` messages (2,000), each to its own recipient, go in over SMTP and out
   to the fake; their relay ids come from the 250 replies and their provider ids from the
   queue (opened read-only by this process, as `relay queue` does).
3. Per run, `--events` fresh events (10,000: processed, delivered, deferred, soft bounces of
   type "blocked", unsubscribes and a few spam reports; no hard bounces or drops, which would
   send reports or re-send mail and muddy the SMTP figure) over those messages, one per
   POST, signed as SendGrid signs (ECDSA P-256 over timestamp + body), all signed before the
   clock starts; 5 % are posted again later, re-signed, as a provider retries.
4. Runs alternate: smtp-source alone (5 KB, 20 sessions) and smtp-source with the events
   posted at 50 keep-alive connections (aiohttp) to POST /webhooks/provider; medians of 3.
   The SMTP count is sized from a warm-up so the SMTP load ends before the posting does
   (the whole SMTP figure is taken under the event load); the report says the overlap.
5. After each run: every POST answered 200, and per message the timeline holds exactly
   one provider event per distinct event posted so far (re-posts add none).

Everything listens on 127.0.0.1; every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import re
import resource
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import aiosmtplib
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.perf import (
    HOST,
    BenchError,
    Provider,
    RelayProcess,
    ensure_postfix,
    free_port,
    git_revision,
    host_busy_percent,
    http_upstream,
    log,
    smtp_source,
    tree_cpu_seconds,
    wait_until,
    write_report,
)

UPSTREAM = "provider"  # http_upstream's name: the webhook path is /webhooks/provider
KEY_VARIABLE = "BENCH_SENDGRID_EVENT_KEY"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
CONNECTIONS = 50
RETRY_SHARE = 0.05
SMTP_SESSIONS = 20
SMTP_SIZE = 5_000
# The SendGrid events posted and their shares. No hard bounce (a report to the sender)
# and no drop (a re-send through another upstream): those add mail to the SMTP side.
EVENT_MIX: tuple[tuple[str, float], ...] = (
    ("processed", 0.30),
    ("delivered", 0.30),
    ("deferred", 0.22),
    ("bounce", 0.12),  # type "blocked": a soft bounce
    ("unsubscribe", 0.04),
    ("spamreport", 0.02),
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


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the relay -------------------------------------------------------------------------


def new_signing_key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A P-256 key pair: the private half signs here, the public half (base64 of DER
    SubjectPublicKeyInfo, as SendGrid shows its verification key) goes to the relay."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


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
    provider_url: str,
    public_key: str,
    workers: int | None,
    samples: Path | None = None,
) -> Iterator[tuple[RelayProcess, str]]:
    """A relay sending to the fake SendGrid and taking its events at a known web port
    (sampled into `samples` when given)."""
    upstream = http_upstream(provider_url) + (
        f'events = true\nwebhook = {{ public_key = "env:{KEY_VARIABLE}" }}\n'
    )
    options: dict[str, Any] = {
        "upstream": upstream,
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
    os.environ[KEY_VARIABLE] = public_key  # RelayProcess passes the environment on
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
    msg_id: str
    event_id: str
    body: bytes
    headers: dict[str, str]


def sendgrid_event(kind: str, primed: Primed, *, at: int, rng: random.Random) -> dict[str, object]:
    """One event as SendGrid's Event Webhook sends it (custom_args flattened in)."""
    event: dict[str, object] = {
        "email": primed.rcpt,
        "timestamp": at,
        "smtp-id": f"<{primed.provider_id}@ismtpd0001p1lon1.sendgrid.net>",
        "event": kind,
        "category": ["bench"],
        "sg_event_id": secrets.token_urlsafe(16),
        "sg_message_id": f"{primed.provider_id}.filterdrecv-5bd6b6c-abcde-1-{at:X}-2.0",
        "relay_id": primed.msg_id,
    }
    if kind == "processed":
        event["pool"] = {"name": "bench", "id": 1}
    elif kind == "delivered":
        event["response"] = "250 2.0.0 OK  1700000000 a1-20020a05 - gsmtp"
        event["tls"] = 1
    elif kind == "deferred":
        event["response"] = "421 4.7.0 Try again later, closing connection."
        event["attempt"] = str(rng.randint(1, 5))
    elif kind == "bounce":
        event["type"] = "blocked"
        event["status"] = "4.7.1"
        event["reason"] = "421 4.7.1 Message temporarily deferred due to user complaints"
        event["bounce_classification"] = "Reputation"
    return event


def sign(key: ec.EllipticCurvePrivateKey, body: bytes) -> dict[str, str]:
    """SendGrid's Signed Event Webhook headers: ECDSA P-256 / SHA-256 over the timestamp's
    text followed by the raw body, base64 of the DER signature."""
    timestamp = str(int(time.time()))
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: base64.b64encode(signature).decode(),
        TIMESTAMP_HEADER: timestamp,
    }


def build_posts(
    primed: Sequence[Primed], count: int, *, key: ec.EllipticCurvePrivateKey, rng: random.Random
) -> tuple[list[SignedPost], Counter[str]]:
    """`count` distinct events, one per POST, plus RETRY_SHARE of them again (re-signed, as
    a provider's retry is a new request), each retry later than its original. Also the
    distinct events per message, which is what the timelines must gain."""
    kinds = [k for k, _ in EVENT_MIX]
    weights = [w for _, w in EVENT_MIX]
    now = int(time.time())
    posts: list[SignedPost] = []
    expected: Counter[str] = Counter()
    for i in range(count):
        target = primed[i % len(primed)]
        doc = sendgrid_event(rng.choices(kinds, weights)[0], target, at=now, rng=rng)
        body = json.dumps([doc]).encode()
        posts.append(SignedPost(target.msg_id, str(doc["sg_event_id"]), body, sign(key, body)))
        expected[target.msg_id] += 1
    rng.shuffle(posts)
    retried = rng.sample(range(count), int(count * RETRY_SHARE))
    for index in sorted(retried, reverse=True):
        original = posts[index]
        again = SignedPost(
            original.msg_id, original.event_id, original.body, sign(key, original.body)
        )
        posts.insert(rng.randint(index + 1, len(posts)), again)
    return posts, expected


@dataclass
class PostResult:
    seconds: float
    latencies_ms: list[float]
    statuses: Counter[int]
    answers: Counter[str]  # the relay's recorded/duplicates/unmatched/requeued, summed
    client_cpu: float  # seconds of this process's CPU while posting

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds


async def post_all(url: str, posts: Sequence[SignedPost]) -> PostResult:
    """Each post in turn over CONNECTIONS keep-alive connections, as fast as answered."""
    target = f"{url}/webhooks/{UPSTREAM}"
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    answers: Counter[str] = Counter()
    pending = iter(posts)
    errors: list[str] = []

    async def connection(http: aiohttp.ClientSession) -> None:
        for post in pending:
            started = time.perf_counter()
            async with http.post(target, data=post.body, headers=post.headers) as resp:
                text = await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[resp.status] += 1
            if resp.status == 200:
                answers.update({k: int(v) for k, v in json.loads(text).items() if k != "status"})
            elif len(errors) < 5:
                errors.append(f"{resp.status} {text[:300]!r}")

    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=60)
    cpu0 = _own_cpu()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        started = time.monotonic()
        await asyncio.gather(*(connection(http) for _ in range(CONNECTIONS)))
        seconds = time.monotonic() - started
    for error in errors:
        log(f"  webhook post refused: {error}")
    return PostResult(seconds, latencies, statuses, answers, _own_cpu() - cpu0)


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
        return cls(
            runs=args.runs or (1 if quick else 3),
            messages=args.messages or (500 if quick else 2_000),
            events=args.events or (2_000 if quick else 10_000),
            smtp_count=args.count,
            workers=args.workers,
            seed=args.seed,
            profile=bool(args.profile),
        )


def run(settings: Settings) -> str:
    ensure_postfix()
    busy = host_busy_percent(2.0)
    if busy > 15:
        log(f"warning: the machine is already {busy:.0f} % busy: the figures will be noisy")
    rng = random.Random(settings.seed)
    key, public_key = new_signing_key()
    baselines: list[Baseline] = []
    loaded: list[Loaded] = []
    expected: Counter[str] = Counter()
    with (
        tempfile.TemporaryDirectory(prefix="relay-bench-events-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        top = Path(tmp)
        provider = Provider(top)
        stack.callback(provider.stop)
        provider.start()
        relay, url = stack.enter_context(
            relay_taking_events(
                top / "relay",
                provider_url=provider.url,
                public_key=public_key,
                workers=settings.workers,
                samples=top if settings.profile else None,
            )
        )
        log(f"relay :{relay.port}, web {url}, fake SendGrid {provider.url}")
        log(f"priming: {settings.messages} messages, each to its own recipient")
        rcpts = asyncio.run(prime(relay.port, settings.messages))
        primed = asyncio.run(provider_ids(relay.config, rcpts, timeout=300))
        sent_total = settings.messages
        drain(provider, sent_total)

        # Warm-up, and the sizes: SMTP alone, then a small posting alone.
        warm = smtp_alone(relay, 1_000)
        sent_total += 1_000
        drain(provider, sent_total)
        warm_posts, warm_expected = build_posts(
            primed, max(500, settings.events // 10), key=key, rng=rng
        )
        warm_result = asyncio.run(post_all(url, warm_posts))
        expected.update(warm_expected)
        if warm_result.statuses.get(200, 0) != len(warm_posts):
            raise BenchError(f"warm-up posts not all answered 200: {dict(warm_result.statuses)}")
        events_alone = warm_result.rate
        # SMTP sized to end before the posting does (which slows under SMTP load too).
        smtp_count = settings.smtp_count or max(
            500, int(0.8 * warm.smtp_rate * settings.events / events_alone)
        )
        log(
            f"warm-up: SMTP alone {warm.smtp_rate:.0f} msg/s, events alone {events_alone:.0f}/s;"
            f" SMTP load per run: {smtp_count} messages"
        )

        for i in range(settings.runs):
            order = ("alone", "events") if i % 2 == 0 else ("events", "alone")
            for which in order:
                if which == "alone":
                    baselines.append(smtp_alone(relay, smtp_count))
                    log(
                        f"run {i + 1}/{settings.runs}: SMTP alone"
                        f" {baselines[-1].smtp_rate:.0f} msg/s"
                    )
                else:
                    posts, run_expected = build_posts(primed, settings.events, key=key, rng=rng)
                    expected.update(run_expected)
                    (top / SAMPLE_SWITCH).touch()
                    try:
                        seconds, cpu, result = asyncio.run(
                            smtp_with_events(relay, url, smtp_count, posts)
                        )
                    finally:
                        (top / SAMPLE_SWITCH).unlink()
                    per_message, _ = asyncio.run(recorded_events(relay.config, list(rcpts)))
                    missing = sum(1 for m in rcpts if per_message[m] < expected[m])
                    extra = sum(1 for m in rcpts if per_message[m] > expected[m])
                    loaded.append(
                        Loaded(
                            smtp_rate=smtp_count / seconds,
                            smtp_seconds=seconds,
                            relay_cpu_percent=cpu,
                            posts=result,
                            missing=missing,
                            extra=extra,
                            recorded_total=sum(per_message.values()),
                            expected_total=sum(expected.values()),
                        )
                    )
                    r = loaded[-1]
                    log(
                        f"run {i + 1}/{settings.runs}: SMTP with events {r.smtp_rate:.0f} msg/s"
                        f" ({seconds:.1f}s); {len(posts)} posts in {result.seconds:.1f}s"
                        f" ({result.rate:.0f}/s), statuses {dict(result.statuses)};"
                        f" recorded {r.recorded_total} of {r.expected_total}"
                        f" (messages short {missing}, over {extra})"
                    )
                sent_total += smtp_count
                drain(provider, sent_total)
        _, by_type = asyncio.run(recorded_events(relay.config, list(rcpts)))
        relay.stop()
        profile = sample_report(top) if settings.profile else []
    text = report(settings, smtp_count, events_alone, baselines, loaded, by_type, busy)
    if profile:
        text += "\n## Where the relay's time goes while events are posted (sampled)\n"
        text += "\n".join(profile) + "\n"
    return text


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


def report(
    settings: Settings,
    smtp_count: int,
    events_alone: float,
    baselines: Sequence[Baseline],
    loaded: Sequence[Loaded],
    by_type: Counter[str],
    busy: float,
) -> str:
    alone = statistics.median(b.smtp_rate for b in baselines)
    under = statistics.median(r.smtp_rate for r in loaded)
    latencies = [ms for r in loaded for ms in r.posts.latencies_ms]
    ratio = under / alone
    # Each run with events against the run alone next to it (same moment of the machine).
    pairs = [r.smtp_rate / b.smtp_rate for r, b in zip(loaded, baselines, strict=False)]
    all_ok = all(
        r.posts.statuses.get(200, 0) == sum(r.posts.statuses.values())
        and r.missing == 0
        and r.extra == 0
        for r in loaded
    )
    posted = sum(len(r.posts.latencies_ms) for r in loaded)
    answers: Counter[str] = Counter()
    for r in loaded:
        answers.update(r.posts.answers)
    last = loaded[-1]
    overlap = statistics.median(min(1.0, r.posts.seconds / r.smtp_seconds) for r in loaded)
    lines = [
        f"# Provider events under SMTP load, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"relay {git_revision()} · {os.cpu_count()} cores, {busy:.0f} % busy before the"
        " start · relay workers:"
        f" {settings.workers if settings.workers is not None else 'default (one per CPU)'} ·"
        f" {settings.events:,} events per run over {settings.messages:,} messages,"
        f" +{RETRY_SHARE:.0%} re-posted · {CONNECTIONS} connections · SMTP {SMTP_SIZE // 1000} KB,"
        f" {SMTP_SESSIONS} sessions, {smtp_count:,} messages per run · medians of"
        f" {settings.runs}, alternating",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| SMTP accepted, alone | {alone:.0f} msg/s | |",
        f"| SMTP accepted, events posted meanwhile | {under:.0f} msg/s | |",
        f"| ratio of the medians | **{ratio:.2f}** | ≥ 0.90 |",
        f"| ratio per run (with events ÷ the alone run beside it) |"
        f" {', '.join(f'{p:.2f}' for p in pairs)} | |",
        f"| events taken while SMTP runs | {statistics.median(r.posts.rate for r in loaded):.0f}"
        f" posts/s (alone, warm-up: {events_alone:.0f}/s) | |",
        f"| webhook POST latency p50 / p95 | {statistics.median(latencies):.1f} /"
        f" {pct(latencies, 0.95):.1f} ms | |",
        f"| posts answered 200 | {sum(r.posts.statuses.get(200, 0) for r in loaded):,} of"
        f" {posted:,} | all |",
        f"| relay's answers: recorded / duplicates / unmatched / requeued |"
        f" {answers['recorded']:,} / {answers['duplicates']:,} / {answers['unmatched']:,} /"
        f" {answers['requeued']:,} | distinct / re-posts / 0 / 0 |",
        f"| provider events on the timelines (warm-up included) | {last.recorded_total:,} of"
        f" {last.expected_total:,} posted | equal |",
        f"| messages with an event missing / recorded twice | {sum(r.missing for r in loaded)}"
        f" / {sum(r.extra for r in loaded)} | 0 / 0 |",
        f"| share of the SMTP load overlapped by the posting | {overlap:.0%} | 100 % |",
        f"| relay CPU (% of one core), SMTP alone / with events |"
        f" {statistics.median(b.relay_cpu_percent for b in baselines):.0f} /"
        f" {statistics.median(r.relay_cpu_percent for r in loaded):.0f} | |",
        f"| the posting client's CPU per run | "
        f"{statistics.median(r.posts.client_cpu for r in loaded):.1f} s | |",
        "",
        "Timeline events by type: "
        + ", ".join(f"{kind} {n:,}" for kind, n in sorted(by_type.items())),
        "",
        f"Verdict: {'all recorded once, none lost' if all_ok else 'EVENTS LOST OR DOUBLED'};"
        f" SMTP ratio {ratio:.2f} ({'meets' if ratio >= 0.90 else 'misses'} 0.90).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["sample-relay"]:
        sample_relay(given[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
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
