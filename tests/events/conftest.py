"""Fixtures the provider webhook tests share: a fixed clock, a WebhookContext with an
in-memory replay guard, and SNS played on loopback (signer and certificate server)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest

from relay.events.base import WebhookContext, WebhookRequest
from tests.fakes.ses_inbound import SNSCertServer, SNSSigner

#: The tests' "now": every provider timestamp is made relative to it.
NOW = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


class MemoryReplayGuard:
    """`Queue.first_use` in memory: enough for one module's unit tests."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    async def __call__(self, key: str, *, now: float, expires: float) -> bool:
        if key in self.seen and self.seen[key] > now:
            return False
        self.seen[key] = expires
        return True


def request(body: bytes, headers: dict[str, str] | None = None) -> WebhookRequest:
    return WebhookRequest(headers=headers or {}, body=body, remote="127.0.0.1")


@pytest.fixture
def context() -> WebhookContext:
    return WebhookContext(clock=NOW.timestamp, first_use=MemoryReplayGuard())


@pytest.fixture(scope="session")
def sns_signer() -> SNSSigner:
    return SNSSigner()


@pytest.fixture
async def sns_cert_server(sns_signer: SNSSigner) -> AsyncIterator[SNSCertServer]:
    """https://sns.eu-west-1.amazonaws.com on loopback (test CA, pinned resolver)."""
    server = SNSCertServer(sns_signer)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
