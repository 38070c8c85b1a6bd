"""Inbound from SES end to end, through a real relay started in-process.

AWS is a moto server (S3, KMS, SQS) holding objects encrypted the way SES's S3 action does;
SNS posts are signed by the test's own key, whose certificate a loopback https server
serves as `sns.eu-west-1.amazonaws.com` (the relay's production host checks run as is).
Destinations are real: Maildirs and directories under tmp_path, an aiosmtpd server, an
aiohttp webhook receiver. Nothing sleeps: tests await queue states (`wait_states`, which
re-checks after every delivery round) and SQS consumer events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hmac
import json
import logging
import os
import random
import socket
import sqlite3
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.lmtp import LMTP

from relay.app import Relay
from relay.checks import check
from relay.cli import main as cli_main
from relay.config import ConfigError
from relay.inbound.destinations.webhook import sign_webhook
from relay.inbound.worker import tag_message
from relay.queue.base import MessageRow
from tests.conftest import RelayFactory, SMTPSink, relay_config, sqlite_spool, wait_states
from tests.fakes.moto_server import MotoEndpoint
from tests.fakes.ses_inbound import (
    ACCOUNT,
    AWS_CLIENT_MISSING,
    REGION,
    S3_TEST_EVENT,
    SIMPLE_MESSAGE,
    TOPIC_ARN,
    SESStore,
    SNSCertServer,
    SNSSigner,
    encrypt_v2,
    new_ses_message_id,
    s3_event,
    ses_encryption_context,
    ses_received,
    sns_envelope,
    sns_timestamp,
)

SECRET = "webhook-shared-secret"
DOCS = "docs@example.com"


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer() -> SNSSigner:
    return SNSSigner()


@pytest.fixture
async def cert_server(signer: SNSSigner) -> AsyncIterator[SNSCertServer]:
    server = SNSCertServer(signer)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def maildir(path: Path) -> dict[str, Any]:
    return {"type": "maildir", "path": str(path)}


def maildir_messages(path: Path) -> list[bytes]:
    new = path / "new"
    if not new.exists():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)]


@dataclass
class Inbound:
    """A started relay with inbound configured, and the AWS side that feeds it."""

    relay: Relay
    store: SESStore
    signer: SNSSigner
    cert_server: SNSCertServer
    http: aiohttp.ClientSession
    moto: MotoEndpoint
    queue_url: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.relay.web_port}/inbound/sns"

    async def post(self, doc: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        headers = {"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "x"}
        async with self.http.post(self.url, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    def ses(
        self,
        raw: bytes = SIMPLE_MESSAGE,
        *,
        recipients: tuple[str, ...] = (DOCS,),
        message_id: str | None = None,
        store: bool = True,
        **kw: Any,
    ) -> dict[str, Any]:
        """Store `raw` as SES would (unless store=False) and return SES's notification."""
        message_id = message_id or new_ses_message_id()
        key = self.store.prefix + message_id
        if store:
            key = self.store.put(raw, message_id=message_id, **kw)
        return ses_received(self.store.bucket, key, message_id=message_id, recipients=recipients)

    def signed(self, notification: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.signer.sign(sns_envelope(json.dumps(notification), **kw))

    async def rows(self) -> list[MessageRow]:
        rows: list[MessageRow] = await self.relay.queue.search(kind="inbound")
        return rows

    async def only(self) -> MessageRow:
        [row] = await self.rows()
        return row

    async def timeline(self, msg_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = await self.relay.queue.timeline(msg_id)
        return events

    async def flush(self) -> None:
        """`relay queue flush`, then wake the inbound scheduler (no waiting for its poll)."""
        await self.relay.queue.flush(now=self.relay.clock(), actor="test")
        assert self.relay.inbound is not None
        self.relay.inbound.wake()


Start = Callable[..., Awaitable[Inbound]]


@pytest.fixture
async def start(
    make_relay: RelayFactory,
    moto: MotoEndpoint,
    cert_server: SNSCertServer,
    signer: SNSSigner,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    tls_files: tuple[str, str],
) -> AsyncIterator[Start]:
    store = SESStore.create(moto)
    own: list[Relay] = []

    async def factory(
        routes: list[dict[str, Any]],
        *,
        sns: bool | dict[str, Any] = True,
        sqs: bool | dict[str, Any] = False,
        retry: dict[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
        **extra: Any,
    ) -> Inbound:
        inbound: dict[str, Any] = {
            "aws": {"region": REGION, "endpoint_url": moto.url},
            "route": routes,
            **extra,
        }
        if sns:
            inbound["sns"] = {"topics": [TOPIC_ARN], **(sns if isinstance(sns, dict) else {})}
        queue_url = ""
        if sqs:
            queue_url = moto.client("sqs").create_queue(QueueName="relay-inbound")["QueueUrl"]
            inbound["sqs"] = {
                "queue_url": queue_url,
                "wait_time": "1s",
                **(sqs if isinstance(sqs, dict) else {}),
            }
        sections: dict[str, Any] = {"inbound": inbound}
        if retry is not None:
            sections["retry"] = retry
        if clock is None:
            relay = await make_relay(**sections)
        else:  # an injected clock: the test moves time instead of waiting for it
            relay = Relay(relay_config(tmp_path, tls_files=tls_files, **sections), clock=clock)
            await relay.start()
            own.append(relay)
        assert relay.inbound is not None
        relay.inbound.cert_fetcher = cert_server.fetcher()
        return Inbound(relay, store, signer, cert_server, http, moto, queue_url)

    yield factory
    for relay in own:
        await relay.stop()


# -- SNS → S3 → decrypt → maildir ------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "wrap", "sig"),
    [(2, "kms", "1"), (2, "kms+context", "2"), (1, "kms", "1"), (0, "kms", "2")],
    ids=["v2-gcm-sigv1", "v2-kms+context-sigv2", "v1-cbc", "plaintext"],
)
async def test_signed_sns_post_delivers_the_decrypted_message_to_a_maildir(
    start: Start, tmp_path: Path, version: int, wrap: str, sig: str
) -> None:
    box = tmp_path / "Maildir"
    env = await start([{"recipients": ["*@example.com"], "destination": maildir(box)}])
    note = env.ses(version=version, wrap=wrap)
    doc = env.signer.sign(sns_envelope(json.dumps(note)), version=sig)
    status, answer = await env.post(doc)
    assert (status, answer["status"], answer["queued"]) == (200, "queued", 1)

    await wait_states(env.relay, sent=1)
    assert maildir_messages(box) == [SIMPLE_MESSAGE]
    row = await env.only()
    assert (row.kind, row.mail_from) == ("inbound", "scanner@partner.example")
    assert row.meta["rcpts_original"] == [DOCS]
    events = await env.timeline(row.id)
    assert [e["type"] for e in events] == ["received", "attempt", "sent"]
    received, attempt, sent = events
    assert received["via"] == "sns"
    assert received["ses_message_id"] == note["mail"]["messageId"]
    assert received["sns_message_id"] == doc["MessageId"]
    assert attempt["destination"] == "route[0]"
    assert attempt["outcome"] == "delivered"
    assert isinstance(attempt["duration_ms"], float)
    assert sent["outcome"] == "delivered"


async def test_object_encrypted_by_the_aws_encryption_client_is_delivered(
    start: Start, tmp_path: Path
) -> None:
    pytest.importorskip("s3_encryption", reason=AWS_CLIENT_MISSING)
    box = tmp_path / "Maildir"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}])
    message_id = new_ses_message_id()
    env.store.put_with_aws_client(SIMPLE_MESSAGE, message_id=message_id)
    note = env.ses(message_id=message_id, store=False)
    status, answer = await env.post(env.signed(note))
    assert (status, answer["status"]) == (200, "queued")
    await wait_states(env.relay, sent=1)
    assert maildir_messages(box) == [SIMPLE_MESSAGE]


async def test_work_is_durable_before_the_200(start: Start, tmp_path: Path) -> None:
    """The answer comes after the row is committed: read it back from disk at once."""
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    status, _ = await env.post(env.signed(env.ses()))
    assert status == 200
    conn = sqlite3.connect(sqlite_spool(env.relay).path)
    try:
        (count,) = conn.execute("SELECT COUNT(*) FROM messages WHERE kind='inbound'").fetchone()
    finally:
        conn.close()
    assert count == 1


async def test_subscription_is_confirmed_and_unsubscribe_ignored(
    start: Start, tmp_path: Path
) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    sub = env.signer.sign(sns_envelope("confirm me", msg_type="SubscriptionConfirmation"))
    status, answer = await env.post(sub)
    assert (status, answer["status"]) == (200, "confirmed")
    assert env.cert_server.confirmations == ["2336412f37fb687f5d51e6e2425c464de"]

    unsub = env.signer.sign(sns_envelope("bye", msg_type="UnsubscribeConfirmation"))
    status, answer = await env.post(unsub)
    assert (status, answer["status"]) == (200, "ignored")
    assert env.cert_server.confirmations == ["2336412f37fb687f5d51e6e2425c464de"]
    assert await env.rows() == []


async def test_ses_setup_notification_is_acknowledged_not_queued(
    start: Start, tmp_path: Path
) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    setup = {"notificationType": "AMAZON_SES_SETUP_NOTIFICATION", "receipt": {}}
    status, answer = await env.post(env.signed(setup))
    assert (status, answer["status"]) == (200, "ignored")
    assert await env.rows() == []


async def test_authentic_notification_without_s3_action_is_a_visible_dead_letter(
    start: Start, tmp_path: Path
) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    note = env.ses(store=False)
    note["receipt"]["action"] = {"type": "Lambda", "functionArn": "arn:aws:lambda:x"}
    status, answer = await env.post(env.signed(note))
    assert (status, answer["status"]) == (200, "unusable")
    await wait_states(env.relay, failed=1)
    row = await env.only()
    assert row.last_error is not None and "is not S3" in row.last_error


# -- bad SNS input ---------------------------------------------------------------------------


def _unsigned(env: Inbound) -> dict[str, Any]:
    return sns_envelope(json.dumps(env.ses(store=False)))


def _tampered(env: Inbound) -> dict[str, Any]:
    doc = env.signed(env.ses(store=False))
    doc["Message"] = json.dumps(env.ses(store=False, recipients=("attacker@example.com",)))
    return doc


def _other_key(env: Inbound) -> dict[str, Any]:
    return SNSSigner().sign(sns_envelope(json.dumps(env.ses(store=False))))


def _stale(env: Inbound) -> dict[str, Any]:
    old = sns_timestamp(dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    return env.signed(env.ses(store=False), timestamp=old)


def _foreign_topic(env: Inbound) -> dict[str, Any]:
    return env.signed(env.ses(store=False), topic_arn=f"arn:aws:sns:{REGION}:{ACCOUNT}:other")


def _foreign_cert_host(env: Inbound) -> dict[str, Any]:
    doc = sns_envelope(json.dumps(env.ses(store=False)))
    return env.signer.sign(doc, cert_url="https://evil.example.com/cert.pem")


def _cert_host_lookalike(env: Inbound) -> dict[str, Any]:
    doc = sns_envelope(json.dumps(env.ses(store=False)))
    return env.signer.sign(doc, cert_url=f"https://sns.{REGION}.amazonaws.com.evil.net/x.pem")


@pytest.mark.parametrize(
    "make_doc",
    [
        _unsigned,
        _tampered,
        _other_key,
        _stale,
        _foreign_topic,
        _foreign_cert_host,
        _cert_host_lookalike,
    ],
    ids=[
        "unsigned",
        "tampered",
        "signed-by-another-key",
        "stale",
        "foreign-topic",
        "cert-elsewhere",
        "cert-lookalike",
    ],
)
async def test_untrusted_sns_posts_get_403_and_queue_nothing(
    start: Start, tmp_path: Path, make_doc: Callable[[Inbound], dict[str, Any]]
) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    status, answer = await env.post(make_doc(env))
    assert status == 403
    assert answer["error"] == "rejected" and answer["detail"]
    assert await env.rows() == []
    if make_doc in (_foreign_cert_host, _cert_host_lookalike, _unsigned, _foreign_topic):
        assert env.cert_server.requests == []  # rejected without fetching anything


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'{"Type": "Notification"}', b"", b"[" * 10_000, b'{"a":' * 5_000],
    ids=["broken-json", "array", "missing-fields", "empty", "nested-arrays", "nested-objects"],
)
async def test_malformed_sns_body_gets_400(start: Start, tmp_path: Path, body: bytes) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    status, answer = await env.post(body)
    assert status == 400
    assert answer["error"] == "malformed"
    assert "Traceback" not in answer["detail"]
    assert await env.rows() == []


async def test_authentic_notification_with_a_deeply_nested_message_is_a_dead_letter(
    start: Start, tmp_path: Path
) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    doc = env.signer.sign(sns_envelope("[" * 10_000))
    status, answer = await env.post(doc)
    assert (status, answer["status"]) == (200, "unusable")
    assert "nested more than" in answer["detail"]
    await wait_states(env.relay, failed=1)


async def test_oversized_sns_body_gets_413(start: Start, tmp_path: Path) -> None:
    env = await start(
        [{"recipients": ["*"], "destination": maildir(tmp_path / "box")}],
        sns={"max_body": "1KiB"},
    )
    status, answer = await env.post(b"{" + b" " * 4096 + b"}")
    assert (status, answer["error"]) == (413, "too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to go by
        for _ in range(8):
            yield b" " * 512

    async with env.http.post(env.url, data=chunked()) as resp:
        assert resp.status == 413


async def test_queue_that_cannot_take_the_work_answers_503(start: Start, tmp_path: Path) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    sqlite_spool(env.relay).min_free_disk = 1 << 62  # no disk is that big: StoreFull
    status, answer = await env.post(env.signed(env.ses()))
    assert (status, answer["error"]) == (503, "queue_full")  # SNS retries later
    assert await env.rows() == []


async def test_unreachable_certificate_is_503_so_sns_retries(start: Start, tmp_path: Path) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    env.cert_server.fail_cert = True
    status, answer = await env.post(env.signed(env.ses(store=False)))
    assert (status, answer["error"]) == (503, "unavailable")
    assert await env.rows() == []


# -- idempotency -------------------------------------------------------------------------------


async def wait_sqs_deleted(env: Inbound, n: int, timeout: float = 30.0) -> None:
    """Wait (on the consumer's batch events, not a timer) until it deleted `n` messages."""
    assert env.relay.inbound is not None and env.relay.inbound.sqs is not None
    consumer = env.relay.inbound.sqs
    async with asyncio.timeout(timeout):
        while consumer.deleted < n:
            consumer.batch_done.clear()
            await consumer.batch_done.wait()


def sqs_counts(env: Inbound) -> tuple[int, int]:
    """(visible, in flight) messages left in the test queue."""
    attrs = env.moto.client("sqs").get_queue_attributes(
        QueueUrl=env.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attrs["ApproximateNumberOfMessages"]),
        int(attrs["ApproximateNumberOfMessagesNotVisible"]),
    )


def sqs_send(env: Inbound, body: dict[str, Any] | str) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    env.moto.client("sqs").send_message(QueueUrl=env.queue_url, MessageBody=text)


async def test_same_ses_message_via_sns_twice_and_via_sqs_is_delivered_once(
    start: Start, tmp_path: Path
) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}], sqs=True)
    note = env.ses()
    first = env.signed(note)
    assert (await env.post(first))[1]["queued"] == 1
    # SNS retrying the same delivery (same MessageId), then a second publish of it...
    assert (await env.post(first))[1]["duplicates"] == 1
    assert (await env.post(env.signed(note)))[1]["duplicates"] == 1
    # ...and the same notification through SQS (SNS fanned out to both), twice.
    sqs_send(env, first)
    sqs_send(env, note)
    await wait_sqs_deleted(env, 2)

    await wait_states(env.relay, sent=1)
    assert maildir_messages(box) == [SIMPLE_MESSAGE]
    assert len(await env.rows()) == 1
    assert sqs_counts(env) == (0, 0)


# -- SQS ---------------------------------------------------------------------------------------


async def test_sqs_sns_wrapped_raw_ses_and_s3_events_are_all_delivered(
    start: Start, tmp_path: Path
) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}], sns=False, sqs=True)
    wrapped = env.ses(SIMPLE_MESSAGE.replace(b"Scan 42", b"wrapped"))
    raw_ses = env.ses(SIMPLE_MESSAGE.replace(b"Scan 42", b"raw ses"), version=1)
    # An S3 event for a key with a space and a plus: S3 form-encodes both.
    key = "inbound/from scanner+1"
    body, meta = encrypt_v2(
        SIMPLE_MESSAGE.replace(b"Scan 42", b"s3 event"),
        kms=env.store.kms,
        key_id=env.store.key_id,
        context=ses_encryption_context("s3-event-message"),
    )
    env.store.s3.put_object(Bucket=env.store.bucket, Key=key, Body=body, Metadata=meta)

    sqs_send(env, sns_envelope(json.dumps(wrapped)))
    sqs_send(env, raw_ses)
    sqs_send(env, s3_event(env.store.bucket, key))
    sqs_send(env, S3_TEST_EVENT)
    await wait_sqs_deleted(env, 4)
    await wait_states(env.relay, sent=3)

    subjects = sorted(m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in maildir_messages(box))
    assert subjects == [b"raw ses", b"s3 event", b"wrapped"]
    assert sqs_counts(env) == (0, 0)
    rows = {r.meta["via"] for r in await env.rows()}
    assert rows == {"sqs"}
    # The S3 event had no envelope: routed by the To header, and the timeline says so.
    [s3_row] = [r for r in await env.rows() if not r.meta["rcpts_original"]]
    events = await env.timeline(s3_row.id)
    assert any(e.get("routing", "").startswith("no envelope recipients") for e in events)


async def test_sqs_malformed_body_is_recorded_as_failed_and_deleted(
    start: Start, tmp_path: Path
) -> None:
    env = await start(
        [{"recipients": ["*"], "destination": maildir(tmp_path / "box")}], sns=False, sqs=True
    )
    sqs_send(env, "this is not json")
    await wait_sqs_deleted(env, 1)
    await wait_states(env.relay, failed=1)
    row = await env.only()
    assert row.last_error is not None and "not JSON" in row.last_error
    events = await env.timeline(row.id)
    assert events[0]["via"] == "sqs" and "sqs_message_id" in events[0]
    assert sqs_counts(env) == (0, 0)


@pytest.mark.parametrize(
    "hostile",
    ["[" * 10_000, json.dumps({"Type": "Notification", "Message": '{"a":' * 5_000})],
    ids=["body", "sns-message"],
)
async def test_sqs_deeply_nested_body_is_a_dead_letter_and_polling_goes_on(
    start: Start, tmp_path: Path, hostile: str
) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}], sns=False, sqs=True)
    sqs_send(env, hostile)
    await wait_sqs_deleted(env, 1)
    sqs_send(env, env.ses())  # the consumer is still polling after the hostile body
    await wait_sqs_deleted(env, 2)
    await wait_states(env.relay, failed=1, sent=1)
    [failed] = [r for r in await env.rows() if r.last_error]
    assert failed.last_error is not None and "nested more than" in failed.last_error
    assert len(maildir_messages(box)) == 1


async def test_sqs_body_from_a_foreign_topic_is_not_delivered(start: Start, tmp_path: Path) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}], sqs=True)
    foreign = sns_envelope(
        json.dumps(env.ses()), topic_arn=f"arn:aws:sns:{REGION}:999999999999:theirs"
    )
    sqs_send(env, foreign)
    await wait_sqs_deleted(env, 1)
    await wait_states(env.relay, failed=1)
    assert maildir_messages(box) == []
    row = await env.only()
    assert row.last_error is not None and "not in inbound.sns.topics" in row.last_error


async def test_sqs_message_stays_in_sqs_when_the_local_queue_is_full(
    start: Start, tmp_path: Path
) -> None:
    env = await start(
        [{"recipients": ["*"], "destination": maildir(tmp_path / "box")}], sns=False, sqs=True
    )
    spool = sqlite_spool(env.relay)
    spool.min_free_disk = 1 << 62  # no disk is that big: StoreFull
    spool._free_checked_at = 0.0
    assert env.relay.inbound is not None and env.relay.inbound.sqs is not None
    consumer = env.relay.inbound.sqs
    sqs_send(env, env.ses())
    async with asyncio.timeout(30):
        while consumer.received < 1:
            consumer.batch_done.clear()
            await consumer.batch_done.wait()
    assert consumer.deleted == 0
    assert await env.rows() == []
    assert sqs_counts(env) == (0, 1)  # in flight: SQS makes it visible again later


async def test_sqs_consumer_stops_promptly_during_a_long_poll(start: Start, tmp_path: Path) -> None:
    env = await start(
        [{"recipients": ["*"], "destination": maildir(tmp_path / "box")}],
        sns=False,
        sqs={"wait_time": "20s"},
    )
    assert env.relay.inbound is not None and env.relay.inbound.sqs is not None
    started = time.monotonic()
    await env.relay.inbound.sqs.stop()
    assert time.monotonic() - started < 5


async def test_sqs_visibility_is_extended_while_recording_is_slow(
    start: Start, tmp_path: Path
) -> None:
    env = await start(
        [{"recipients": ["*"], "destination": maildir(tmp_path / "box")}],
        sns=False,
        sqs={"visibility_timeout": "1s"},
    )
    service = env.relay.inbound
    assert service is not None and service.sqs is not None
    consumer = service.sqs
    loop = asyncio.get_running_loop()
    extended = asyncio.Event()
    release = asyncio.Event()
    change = consumer._change_visibility

    def spy(handles: list[str], timeout: int) -> None:
        change(handles, timeout)
        loop.call_soon_threadsafe(extended.set)

    enqueue = service.enqueue

    async def slow_enqueue(work: Any, *, via: str, extra: dict[str, Any]) -> bool:
        await release.wait()  # a disk that takes longer than the visibility timeout
        return await enqueue(work, via=via, extra=extra)

    consumer._change_visibility = spy  # type: ignore[method-assign]
    service.enqueue = slow_enqueue  # type: ignore[method-assign]
    sqs_send(env, env.ses())
    async with asyncio.timeout(30):
        await extended.wait()
    assert sqs_counts(env) == (0, 1)  # still invisible to any other consumer
    release.set()
    await wait_sqs_deleted(env, 1)
    await wait_states(env.relay, sent=1)
    assert sqs_counts(env) == (0, 0)


# -- destinations --------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver that checks the signature and fails `failures` times first."""

    failures: int = 0
    status: int = 500
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        expected = sign_webhook(SECRET, request.headers["X-Relay-Timestamp"], body)
        if not hmac.compare_digest(expected, request.headers.get("X-Relay-Signature", "")):
            return web.Response(status=401, text="bad signature")
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=self.status, text="internal error")
        head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
        form = BytesParser(policy=email_policy.default).parsebytes(head + body)
        assert isinstance(form, EmailMessage)
        parts = {}
        for part in form.iter_parts():
            name = part.get_param("name", header="content-disposition")
            parts[str(name) if part.get_filename() is None else part.get_filename()] = (
                part.get_payload(decode=True)
            )
        self.received.append({"headers": dict(request.headers), "parts": parts})
        return web.Response(status=200, text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield rec, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    await runner.cleanup()


async def test_webhook_that_fails_then_recovers_gets_the_message_once(
    start: Start, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.failures = 1
    env = await start(
        [{"recipients": ["*"], "destination": {"type": "webhook", "url": url, "secret": SECRET}}]
    )
    note = env.ses()
    await env.post(env.signed(note))
    await wait_states(env.relay, deferred=1)
    row = await env.only()
    assert row.last_error is not None and "HTTP 500" in row.last_error
    assert rec.received == []

    await env.flush()
    await wait_states(env.relay, sent=1)
    [got] = rec.received
    meta = json.loads(got["parts"]["message"])
    assert meta["subject"] == "Scan 42"
    assert meta["recipients"] == [DOCS]
    assert meta["sender"] == "scanner@partner.example"
    assert meta["delivery_id"] == f"ses:{note['mail']['messageId']}"
    assert got["parts"]["scan 42.pdf"] == b"%PDF-1.4 fake scan\n"
    events = await env.timeline(row.id)
    assert [e["type"] for e in events] == [
        "received",
        "attempt",
        "deferred",
        "flushed",
        "attempt",
        "sent",
    ]
    assert events[1]["outcome"] == "transient" and events[4]["outcome"] == "delivered"


async def test_webhook_4xx_fails_the_work_without_retry(
    start: Start, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    env = await start(
        [{"recipients": ["*"], "destination": {"type": "webhook", "url": url, "secret": "wrong"}}]
    )
    await env.post(env.signed(env.ses()))
    await wait_states(env.relay, failed=1)
    row = await env.only()
    assert row.last_error is not None and "HTTP 401" in row.last_error
    assert rec.attempts == 1


async def test_downstream_smtp_down_then_up(start: Start, sink: SMTPSink) -> None:
    port = sink.port
    await sink.stop()
    env = await start(
        [
            {
                "recipients": ["*@example.com"],
                "destination": {"type": "smtp", "host": "127.0.0.1", "port": port, "tls": "none"},
            }
        ]
    )
    await env.post(env.signed(env.ses(recipients=(DOCS, "ops@example.com"))))
    await wait_states(env.relay, deferred=1)
    row = await env.only()
    assert row.rcpts == [DOCS, "ops@example.com"]

    await sink.start(port)
    await env.flush()
    await wait_states(env.relay, sent=1)
    [got] = sink.messages
    assert got.mail_from == "scanner@partner.example"
    assert got.rcpt_tos == [DOCS, "ops@example.com"]
    assert got.data == SIMPLE_MESSAGE


async def test_lmtp_destination_gets_per_recipient_delivery(start: Start) -> None:
    sink = SMTPSink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: LMTP(sink, hostname="lmtp.test"), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        env = await start(
            [
                {
                    "recipients": ["*"],
                    "destination": {"type": "lmtp", "host": "127.0.0.1", "port": port},
                }
            ]
        )
        await env.post(env.signed(env.ses()))
        await wait_states(env.relay, sent=1)
        [got] = sink.messages
        assert (got.rcpt_tos, got.data) == ([DOCS], SIMPLE_MESSAGE)
    finally:
        server.close()
        await server.wait_closed()


async def test_partial_refusal_retries_only_the_refused_recipient(
    start: Start, sink: SMTPSink
) -> None:
    sink.rcpt_replies["ops@example.com"] = "450 4.2.1 mailbox busy"
    env = await start(
        [
            {
                "recipients": ["*"],
                "destination": {
                    "type": "smtp",
                    "host": "127.0.0.1",
                    "port": sink.port,
                    "tls": "none",
                },
            }
        ]
    )
    await env.post(env.signed(env.ses(recipients=(DOCS, "ops@example.com"))))
    await wait_states(env.relay, deferred=1)
    row = await env.only()
    assert row.rcpts == ["ops@example.com"]
    assert [m.rcpt_tos for m in sink.messages] == [[DOCS]]

    sink.rcpt_replies.clear()
    await env.flush()
    await wait_states(env.relay, sent=1)
    assert [m.rcpt_tos for m in sink.messages] == [[DOCS], ["ops@example.com"]]


async def test_recipients_are_routed_to_their_own_destinations(
    start: Start, tmp_path: Path
) -> None:
    scans, rest = tmp_path / "scans", tmp_path / "rest"
    env = await start(
        [
            {"name": "scans", "recipients": ["SCANS@example.com"], "destination": maildir(scans)},
            {"name": "rest", "recipients": ["*@example.com"], "destination": maildir(rest)},
        ]
    )
    await env.post(env.signed(env.ses(recipients=("scans@example.com", DOCS, "x@elsewhere.test"))))
    await wait_states(env.relay, failed=1)
    assert maildir_messages(scans) == [SIMPLE_MESSAGE]
    assert maildir_messages(rest) == [SIMPLE_MESSAGE]
    row = await env.only()
    assert row.last_error is not None
    assert row.last_error.startswith("partly delivered; failed: x@elsewhere.test: no [[inbound")
    events = await env.timeline(row.id)
    assert [e["destination"] for e in events if e["type"] == "attempt"] == ["scans", "rest"]


async def test_directory_destination_gets_safe_attachment_names(
    start: Start, tmp_path: Path
) -> None:
    docs = tmp_path / "documents"
    raw = (
        b"From: scanner@partner.example\r\nTo: docs@example.com\r\nSubject: evil\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="../../etc/passwd"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"root:x:0:0\n")
        + b"\r\n--B--\r\n"
    )
    env = await start(
        [{"recipients": ["*"], "destination": {"type": "directory", "path": str(docs)}}]
    )
    await env.post(env.signed(env.ses(raw)))
    await wait_states(env.relay, sent=1)
    assert os.listdir(docs) == ["passwd"]
    assert (docs / "passwd").read_bytes() == b"root:x:0:0\n"
    assert not (tmp_path / "etc").exists()


# -- spam and virus verdicts -----------------------------------------------------------------------


async def test_spam_is_tagged_and_virus_is_quarantined(start: Start, tmp_path: Path) -> None:
    box, quarantine = tmp_path / "box", tmp_path / "quarantine"
    env = await start(
        [{"recipients": ["*"], "destination": maildir(box)}], quarantine=str(quarantine)
    )
    spam = env.ses(SIMPLE_MESSAGE, message_id="spam-message")
    spam["receipt"]["spamVerdict"] = {"status": "FAIL"}
    virus = env.ses(SIMPLE_MESSAGE, message_id="virus-message")
    virus["receipt"]["virusVerdict"] = {"status": "FAIL"}
    await env.post(env.signed(spam))
    await env.post(env.signed(virus))
    await wait_states(env.relay, sent=2)

    [tagged] = maildir_messages(box)
    assert tagged.startswith(b"X-Relay-Verdicts: spam=FAIL; virus=PASS")
    assert b"X-Spam-Flag: YES\r\n" in tagged
    assert b"\r\nSubject: [SPAM] Scan 42\r\n" in tagged
    assert tagged.endswith(SIMPLE_MESSAGE.split(b"Subject: Scan 42\r\n", 1)[1])
    [held] = maildir_messages(quarantine)
    assert held.startswith(b"X-Relay-Quarantined: virus")
    assert held.endswith(SIMPLE_MESSAGE)
    assert b"X-Relay-Recipients: docs@example.com" in held


def test_tagging_adds_a_subject_when_there_is_none() -> None:
    out = tag_message(b"From: a@b\n\nbody\n", spam=True, virus=False, verdicts="spam=FAIL")
    assert (
        out
        == b"X-Relay-Verdicts: spam=FAIL\nX-Spam-Flag: YES\nSubject: [SPAM]\nFrom: a@b\n\nbody\n"
    )


# -- fetch and decrypt failures --------------------------------------------------------------------


async def _failed_reason(env: Inbound, box: Path) -> str:
    await wait_states(env.relay, failed=1)
    assert maildir_messages(box) == []  # never delivered as garbage
    row = await env.only()
    events = await env.timeline(row.id)
    assert [e["type"] for e in events] == ["received", "attempt", "failed"]
    assert events[1]["outcome"] == "permanent"
    assert events[2]["reason"] == row.last_error
    assert row.last_error is not None
    return row.last_error


async def test_missing_s3_object_fails_with_the_reason(start: Start, tmp_path: Path) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}])
    await env.post(env.signed(env.ses(store=False)))
    reason = await _failed_reason(env, box)
    assert reason.startswith("fetch s3://relay-inbound-mail/inbound/") and "NoSuchKey" in reason


async def test_wrong_encryption_context_fails_at_kms(start: Start, tmp_path: Path) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}])
    message_id = new_ses_message_id()
    body, meta = encrypt_v2(
        SIMPLE_MESSAGE,
        kms=env.store.kms,
        key_id=env.store.key_id,
        context=ses_encryption_context(message_id),
    )
    meta["x-amz-matdesc"] = json.dumps(ses_encryption_context("some-other-message"))
    key = env.store.prefix + message_id
    env.store.s3.put_object(Bucket=env.store.bucket, Key=key, Body=body, Metadata=meta)
    await env.post(env.signed(env.ses(message_id=message_id, store=False)))
    reason = await _failed_reason(env, box)
    assert "KMS InvalidCiphertextException" in reason
    assert reason.endswith("not delivered")


async def test_corrupted_wrapped_key_is_a_kms_error(start: Start, tmp_path: Path) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}])
    message_id = new_ses_message_id()
    body, meta = encrypt_v2(
        SIMPLE_MESSAGE,
        kms=env.store.kms,
        key_id=env.store.key_id,
        context=ses_encryption_context(message_id),
    )
    meta["x-amz-key-v2"] = base64.b64encode(os.urandom(180)).decode()
    env.store.s3.put_object(
        Bucket=env.store.bucket, Key=env.store.prefix + message_id, Body=body, Metadata=meta
    )
    await env.post(env.signed(env.ses(message_id=message_id, store=False)))
    reason = await _failed_reason(env, box)
    assert "KMS" in reason


async def test_corrupted_ciphertext_fails_its_authentication_tag(
    start: Start, tmp_path: Path
) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}])
    note = env.ses()
    key = note["receipt"]["action"]["objectKey"]
    obj = env.store.s3.get_object(Bucket=env.store.bucket, Key=key)
    body = bytearray(obj["Body"].read())
    body[10] ^= 0x01
    env.store.s3.put_object(
        Bucket=env.store.bucket, Key=key, Body=bytes(body), Metadata=obj["Metadata"]
    )
    await env.post(env.signed(note))
    reason = await _failed_reason(env, box)
    assert "AES-GCM authentication failed" in reason
    assert reason.endswith("; not delivered")


async def test_work_past_max_age_fails(start: Start, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.failures = 1000
    now = [time.time()]
    env = await start(
        [{"recipients": ["*"], "destination": {"type": "webhook", "url": url, "secret": SECRET}}],
        retry={"schedule": ["30s"], "max_age": "1h", "bounces": False},
        clock=lambda: now[0],
    )
    await env.post(env.signed(env.ses()))
    await wait_states(env.relay, deferred=1)
    now[0] += 3600  # past max_age: the next round is the last one
    assert env.relay.inbound is not None
    env.relay.inbound.wake()
    await wait_states(env.relay, failed=1)
    row = await env.only()
    assert row.last_error is not None
    assert row.last_error.startswith(f"{DOCS}: gave up after 2 rounds over 1.0h (retry.max_age)")
    assert "HTTP 500" in row.last_error
    assert rec.attempts == 2


# -- the operator's view ------------------------------------------------------------------------


async def run_cli(config: Path, *args: str) -> tuple[int, str]:
    """`relay --config ... args` in a thread (it opens the queue database itself)."""
    import io

    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return cli_main(["--config", str(config), *args])

    code = await asyncio.to_thread(run)
    return code, out.getvalue()


async def test_queue_list_show_and_retry_for_inbound_work(start: Start, tmp_path: Path) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}])
    message_id = new_ses_message_id()
    await env.post(env.signed(env.ses(message_id=message_id, store=False)))
    await wait_states(env.relay, failed=1)
    row = await env.only()

    config = tmp_path / "cli.toml"
    config.write_text(f'[server]\nqueue = "{env.relay.config.queue_dir}"\nmin_free_disk = 0\n')
    code, listing = await run_cli(config, "queue", "list", "--kind", "inbound")
    assert code == 0
    assert row.id in listing and "inbound" in listing and "failed" in listing
    assert "<scanner@partner.example> -> docs@example.com" in listing
    assert "NoSuchKey" in listing

    code, shown = await run_cli(config, "queue", "show", row.id)
    assert code == 0
    assert "kind:      inbound" in shown
    for event in ("received", "attempt", "failed"):
        assert f"  {event} " in shown

    env.store.put(SIMPLE_MESSAGE, message_id=message_id)  # the operator restored the object
    code, _ = await run_cli(config, "queue", "retry", row.id)
    assert code == 0
    assert env.relay.inbound is not None
    env.relay.inbound.wake()
    await wait_states(env.relay, sent=1, failed=0)
    assert maildir_messages(box) == [SIMPLE_MESSAGE]
    events = await env.timeline(row.id)
    assert [e["type"] for e in events][-3:] == ["retry", "attempt", "sent"]


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inbound", "match"),
    [
        (
            {"sns": {"topics": [TOPIC_ARN]}, "route": [{"recipients": ["*"], "destination": {}}]},
            r"inbound\.route\[0\]\.destination\.type: unknown destination type",
        ),
        (
            {
                "sns": {"topics": [TOPIC_ARN]},
                "route": [{"recipients": ["*"], "destination": {"type": "ftp"}}],
            },
            r"inbound\.route\[0\]\.destination\.type",
        ),
        (
            {
                "sns": {"topics": [TOPIC_ARN]},
                "route": [
                    {"recipients": ["*"], "destination": {"type": "maildir", "path": "x"}},
                    {"recipients": ["*"], "destination": {"type": "webhook", "url": "ftp://x"}},
                ],
            },
            r"inbound\.route\[1\]\.destination: url must be http",
        ),
        (
            {"sns": {}, "route": [{"recipients": ["*"], "destination": {"type": "maildir"}}]},
            r"inbound\.sns: topics: required",
        ),
        (
            {"route": [{"recipients": ["*"], "destination": {"type": "maildir", "path": "x"}}]},
            r"inbound: configure \[inbound\.sns\]",
        ),
        (
            {"sns": {"topics": [TOPIC_ARN]}},
            r"inbound\.route: at least one",
        ),
        (
            {"sqs": {"queue_url": "https://sqs/q", "wait_time": "30s"}, "route": []},
            r"inbound\.sqs: wait_time must be between",
        ),
        (
            {
                "sns": {"topics": [TOPIC_ARN]},
                "route": [
                    {
                        "recipients": ["*"],
                        "spam": "drop",
                        "destination": {"type": "maildir", "path": "x"},
                    }
                ],
            },
            r"inbound\.route\[0\]\.spam: must be one of",
        ),
        (
            {"sns": {"topics": [TOPIC_ARN]}, "surprise": 1, "route": []},
            r"inbound\.surprise: unknown key",
        ),
    ],
)
def test_config_errors_name_the_inbound_key(
    tmp_path: Path, inbound: dict[str, Any], match: str
) -> None:
    cfg = relay_config(tmp_path, inbound=inbound)  # parse() leaves [inbound] raw
    with pytest.raises(ConfigError, match=match):
        check(cfg)


def test_config_check_passes_for_a_complete_inbound_section(tmp_path: Path) -> None:
    cfg = relay_config(
        tmp_path,
        inbound={
            "aws": {"region": "eu-west-1"},
            "sns": {"topics": [TOPIC_ARN], "max_age": "30m"},
            "sqs": {"queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/inbound"},
            "route": [
                {"recipients": ["scans@example.com"], "destination": maildir(tmp_path / "s")},
                {
                    "recipients": ["*"],
                    "spam": "quarantine",
                    "destination": {"type": "lmtp", "socket": "/run/dovecot/lmtp"},
                },
            ],
        },
    )
    check(cfg)
    from relay.inbound.settings import parse_inbound

    settings = parse_inbound(cfg.inbound, cfg)
    assert [r.name for r in settings.routes] == ["route[0]", "route[1]"]
    assert settings.route_for("Scans@Example.COM") is settings.routes[0]
    assert settings.catch_all is settings.routes[1]
    assert settings.routes[1].quarantine == str(tmp_path / "var" / "quarantine")


# -- hostile clients on the SNS endpoint: one log line each, no traceback --------------------


async def raw_exchange(port: int, data: bytes, *, reset: bool) -> bytes:
    """Send `data` over a raw socket; with `reset`, abort the connection (RST) instead of
    reading the answer, as a client that dies mid-body does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return b""
    answer = await reader.read()
    writer.close()
    return answer


class LogWaiter(logging.Handler):
    """Sets `seen` when a record from `logger_name` arrives: tests await the log line
    instead of sleeping until it has probably been written."""

    def __init__(self, logger_name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger_name = logger_name
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == self.logger_name:
            self.seen.set()


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    loud = [r for r in loud if r.levelno > logging.DEBUG]
    assert loud == [], [f"{r.name} {r.levelname} {r.getMessage()}" for r in loud]


async def test_client_resetting_mid_body_is_one_info_line(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    assert env.relay.web_port is not None
    waiter = LogWaiter("relay.web")
    logging.getLogger("relay.web").addHandler(waiter)
    caplog.set_level(logging.DEBUG)
    try:
        head = (
            b"POST /inbound/sns HTTP/1.1\r\nHost: relay.test\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"Type": "Notification", ' + b" " * 4000
        )
        await raw_exchange(env.relay.web_port, head, reset=True)
        async with asyncio.timeout(10):
            await waiter.seen.wait()
    finally:
        logging.getLogger("relay.web").removeHandler(waiter)
    [line] = [r for r in caplog.records if r.name == "relay.web"]
    assert line.levelno == logging.INFO and not line.exc_info
    assert "127.0.0.1" in line.getMessage() and "mid-body" in line.getMessage()
    assert_no_tracebacks(caplog)
    assert await env.rows() == []


GARBAGE = {
    "duplicate-content-length": b"POST /inbound/sns HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n{}",
    "header-too-long": b"POST /inbound/sns HTTP/1.1\r\nHost: x\r\nX-A: "
    + b"a" * 70_000
    + b"\r\n\r\n",
    "bad-header-name": b"POST /inbound/sns HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    "nul-in-target": b"POST /inbound/\x00sns HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown-http-version": b"POST /inbound/sns HTTP/7.1\r\nHost: x\r\n\r\n",
    "content-length-not-a-number": b"POST /inbound/sns HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: -1\r\n\r\n",
    "bad-chunk-size-mid-body": b"POST /inbound/sns HTTP/1.1\r\nHost: x\r\n"
    b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[[[[[\r\nzz\r\n",
}


@pytest.mark.parametrize("request_bytes", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_requests_are_a_400_and_one_warning_line(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    env = await start([{"recipients": ["*"], "destination": maildir(tmp_path / "box")}])
    assert env.relay.web_port is not None
    caplog.set_level(logging.DEBUG)
    answer = await raw_exchange(env.relay.web_port, request_bytes, reset=False)
    status_lines = [line for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.")]
    assert status_lines and b" 400 " in status_lines[-1], answer[:300]
    lines = [r for r in caplog.records if r.name == "relay.web"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING and "127.0.0.1" in lines[0].getMessage()
    assert "b'" not in lines[0].getMessage()  # the client's bytes are not quoted in the log
    assert_no_tracebacks(caplog)
    assert await env.rows() == []


# -- fuzzing the SNS endpoint: seeded, bounded, in the suite ------------------------------------


def _mutate(rnd: random.Random, valid: dict[str, Any]) -> bytes:
    """One hostile variant of a valid signed SNS post: broken bytes, deep nesting, wrong
    types, odd Unicode, or a field changed under a signature that no longer covers it."""
    raw = json.dumps(valid).encode()
    kind = rnd.randrange(9)
    if kind == 0:  # bytes flipped
        data = bytearray(raw)
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        return bytes(data)
    if kind == 1:  # cut short
        return raw[: rnd.randrange(len(raw))]
    if kind == 2:  # nesting inserted somewhere
        at = rnd.randrange(len(raw))
        return raw[:at] + rnd.choice([b"[", b'{"a":']) * rnd.randint(1, 20_000) + raw[at:]
    if kind == 3:  # noise
        return rnd.randbytes(rnd.randint(0, 3000))
    doc = dict(valid)
    field = rnd.choice([*doc, "Subject", "Extra"])
    if kind == 4:  # a wrong type
        doc[field] = rnd.choice([None, 1, -1.5e308, True, [], {}, [[["x"]]], {"a": {"b": 1}}])
        return json.dumps(doc).encode()
    if kind == 5:  # odd strings: lone surrogates, NUL, control characters, very long
        doc[field] = rnd.choice(["\ud800", "a\x00b", "\u2028\r\n", "x" * 100_000, "é" * 999, ""])
        return json.dumps(doc).encode()
    if kind == 6:  # a number too long to convert
        return raw[:-1] + b', "Big": ' + b"9" * rnd.randint(4_000, 20_000) + b"}"
    if kind == 7:  # wrapped or repeated
        return rnd.choice([b"[" + raw + b"]", raw + raw, b'{"Type": ' + raw + b"}"])
    return raw.replace(b'"', b"'", rnd.randint(1, 5))  # not JSON quoting


async def test_fuzzed_sns_posts_get_json_answers_and_a_valid_post_still_works(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = tmp_path / "box"
    env = await start([{"recipients": ["*"], "destination": maildir(box)}])
    rnd = random.Random(20261130)
    valid = env.signed(env.ses())
    seen: dict[int, int] = {}
    for _ in range(600):
        async with env.http.post(env.url, data=_mutate(rnd, valid)) as resp:
            seen[resp.status] = seen.get(resp.status, 0) + 1
            answer = await resp.json()
        # 503: a certificate path changed on the real SNS host can't be fetched (SNS retries)
        assert resp.status in (200, 400, 403, 413, 503), (resp.status, answer)
        if resp.status != 200:
            assert set(answer) == {"error", "detail"} and isinstance(answer["detail"], str)
            assert "Traceback" not in answer["detail"]
    assert seen.get(400, 0) > 100 and seen.get(403, 0) > 50, seen  # both paths exercised
    status, answer = await env.post(valid)
    assert status == 200 and answer["status"] == "queued"
    await wait_states(env.relay, sent=1)
    assert maildir_messages(box) == [SIMPLE_MESSAGE]
    assert_no_tracebacks(caplog)
