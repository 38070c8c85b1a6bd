"""Fixtures pairing each HTTP upstream with its fake provider, and the failure cases every
HTTP upstream must classify the same way.

A test that takes a `failure` argument is run once per case in FAILURE_CASES (see
`pytest_generate_tests`), so each provider's test module states the contract in one line.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from relay.message import Envelope
from relay.outcomes import Accepted, PermanentError, TransientError, UpstreamError
from relay.upstreams.http import HTTPUpstream, shared_session
from relay.upstreams.mailgun import MailgunUpstream
from relay.upstreams.postmark import PostmarkUpstream
from relay.upstreams.sendgrid import SendGridUpstream
from relay.upstreams.sparkpost import SparkPostUpstream
from tests.fakes.providers import (
    FAKE_KEY,
    FakeMailgun,
    FakePostmark,
    FakeProvider,
    FakeSendGrid,
    FakeSparkPost,
)

# hidden@example.org is an envelope-only (Bcc) recipient: it must be delivered.
ENVELOPE = Envelope(
    "bounces@example.com", ("to@example.net", "cc@example.net", "hidden@example.org")
)
MESSAGE = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: Someone <to@example.net>\r\n"
    b"Cc: cc@example.net\r\n"
    b"Subject: Hello\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"X-Relay-ID: 01HRELAYID\r\n"
    b"\r\n"
    b"Hi there.\r\n"
)

# Attachments, an inline image, RFC 2047 subject and names, an RFC 2231 file name.
RICH_ENVELOPE = Envelope("juergen@example.com", ("anna@example.net", "bcc@example.org"))
RICH = b"""\
From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.com>
To: =?iso-8859-1?q?Anna_Sch=F6n?= <anna@example.net>
Reply-To: =?utf-8?b?U3TDuHR0ZQ==?= <replies@example.com>
Subject: =?utf-8?q?=C3=9Cberweisung_f=C3=BCr?= =?utf-8?q?_M=C3=A4rz?=
X-Mailer: Scan2Mail 3.1
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Gr=FC=DFe
--alt
Content-Type: multipart/related; boundary="rel"

--rel
Content-Type: text/html; charset=utf-8

<p>Gr\xc3\xbc\xc3\x9fe <img src="cid:logo@example.com"></p>
--rel
Content-Type: image/png
Content-Transfer-Encoding: base64
Content-ID: <logo@example.com>

iVBORw0KGgo=
--rel--
--alt--
--outer
Content-Type: application/pdf
Content-Disposition: attachment; filename*=utf-8''Rechnung%20M%C3%A4rz.pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQgZmFrZQ==
--outer--
""".replace(b"\n", b"\r\n")


@dataclass
class Pair:
    fake: FakeProvider
    upstream: HTTPUpstream

    async def send(self, envelope: Envelope = ENVELOPE, data: bytes = MESSAGE) -> Accepted:
        return await self.upstream.send(envelope, data)

    async def failure(self, envelope: Envelope = ENVELOPE, data: bytes = MESSAGE) -> UpstreamError:
        with pytest.raises(UpstreamError) as info:
            await self.send(envelope, data)
        return info.value


@asynccontextmanager
async def running(fake: FakeProvider, make: Callable[[str], HTTPUpstream]) -> AsyncIterator[Pair]:
    upstream = make(await fake.start())
    await upstream.start()
    try:
        yield Pair(fake, upstream)
    finally:
        await upstream.close()
        await fake.stop()
    assert shared_session.users == 0, "an upstream kept the shared session"


@pytest.fixture
async def sendgrid() -> AsyncIterator[Pair]:
    async with running(
        FakeSendGrid(),
        lambda url: SendGridUpstream("sendgrid", api_key=FAKE_KEY, base_url=url, timeout=5.0),
    ) as pair:
        yield pair


@pytest.fixture
async def mailgun() -> AsyncIterator[Pair]:
    async with running(
        FakeMailgun(domain="mg.example.com"),
        lambda url: MailgunUpstream(
            "mailgun", api_key=FAKE_KEY, domain="mg.example.com", base_url=url, timeout=5.0
        ),
    ) as pair:
        yield pair


@pytest.fixture
async def sparkpost() -> AsyncIterator[Pair]:
    async with running(
        FakeSparkPost(),
        lambda url: SparkPostUpstream("sparkpost", api_key=FAKE_KEY, base_url=url, timeout=5.0),
    ) as pair:
        yield pair


@pytest.fixture
async def postmark() -> AsyncIterator[Pair]:
    async with running(
        FakePostmark(),
        lambda url: PostmarkUpstream("postmark", api_key=FAKE_KEY, base_url=url, timeout=5.0),
    ) as pair:
        yield pair


# -- failure cases shared by every HTTP upstream -------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True)
class FailureCase:
    """One way a provider can fail, and the outcome every HTTP upstream must report."""

    name: str
    arm: Callable[[Pair], None]
    kind: type[UpstreamError]
    upstream_wide: bool
    ambiguous: bool = False
    retry_after: float | None = None
    reason: str = ""

    async def run(self, pair: Pair) -> None:
        """Arm the failure, send once, check the outcome, then prove the next send works."""
        fake, upstream = pair.fake, pair.upstream
        base_url, timeout = upstream.base_url, upstream.timeout
        self.arm(pair)
        error = await pair.failure()
        assert type(error) is self.kind, error
        assert (error.upstream_wide, error.ambiguous) == (self.upstream_wide, self.ambiguous)
        assert getattr(error, "retry_after", None) == self.retry_after
        assert self.reason in error.reason
        assert fake.requests == []
        fake.release()
        upstream.base_url, upstream.timeout = base_url, timeout
        assert (await pair.send()).provider_id == fake.requests[0].provider_id


def _hang(pair: Pair) -> None:
    pair.fake.hang()
    pair.upstream.timeout = 0.2


def _unreachable(pair: Pair) -> None:
    pair.upstream.base_url = f"http://127.0.0.1:{_closed_port()}"


FAILURE_CASES = [
    FailureCase(
        "throttled",
        lambda p: p.fake.fail(429, headers={"Retry-After": "7"}),
        TransientError,
        upstream_wide=False,
        retry_after=7.0,
        reason="429",
    ),
    FailureCase(
        "unavailable", lambda p: p.fake.fail(503), TransientError, upstream_wide=False, reason="503"
    ),
    FailureCase(
        "server_error",
        lambda p: p.fake.fail(500),
        TransientError,
        upstream_wide=False,  # counted towards failures_to_open, not an outage at once
        reason="500",
    ),
    FailureCase(
        "bad_key", lambda p: p.fake.fail(401), PermanentError, upstream_wide=True, reason="401"
    ),
    FailureCase(
        "rejected",
        lambda p: p.fake.fail(p.fake.reject_status, message="invalid message"),
        PermanentError,
        upstream_wide=False,
        reason="invalid message",
    ),
    FailureCase(
        "hang",
        _hang,
        TransientError,
        upstream_wide=False,
        ambiguous=True,
        reason="timed out after the request was sent",
    ),
    FailureCase(
        "dropped",
        lambda p: p.fake.drop(),
        TransientError,
        upstream_wide=True,
        ambiguous=True,
        reason="after the request was sent",
    ),
    FailureCase(
        "refused",
        _unreachable,
        TransientError,
        upstream_wide=True,
        reason="before the request was sent",
    ),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "failure" in metafunc.fixturenames:
        metafunc.parametrize("failure", FAILURE_CASES, ids=[c.name for c in FAILURE_CASES])
