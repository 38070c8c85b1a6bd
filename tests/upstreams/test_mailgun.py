from __future__ import annotations

import asyncio

import pytest

from relay.message import Envelope
from relay.outcomes import PermanentError, TransientError
from relay.upstreams.mailgun import MailgunUpstream
from tests.upstreams.conftest import ENVELOPE, MESSAGE, RICH, RICH_ENVELOPE, FailureCase, Pair


async def test_raw_mime_and_every_envelope_recipient_reach_mailgun(mailgun: Pair) -> None:
    accepted = await mailgun.send()

    sent = mailgun.fake.requests[0]
    assert sent.path == "/v3/mg.example.com/messages.mime"
    assert sent.body["to"] == list(ENVELOPE.rcpt_tos)  # hidden@example.org (Bcc) included
    assert sent.body["message"] == [MESSAGE]  # byte for byte: the DKIM signature holds
    assert sent.body["o:tracking"] == ["no"]
    assert accepted.provider_id == sent.provider_id  # without Mailgun's angle brackets


async def test_the_relay_id_travels_as_a_custom_variable(mailgun: Pair) -> None:
    """Mailgun returns v: variables in every event's user-variables: the way back to us."""
    await mailgun.send(Envelope(ENVELOPE.mail_from, ENVELOPE.rcpt_tos, queue_id="01J5Z3K8Q9"))
    assert mailgun.fake.requests[0].body["v:relay_id"] == ["01J5Z3K8Q9"]


async def test_no_relay_id_no_custom_variable(mailgun: Pair) -> None:
    await mailgun.send()
    assert not [name for name in mailgun.fake.requests[0].body if name.startswith("v:")]


async def test_failure_is_classified(mailgun: Pair, failure: FailureCase) -> None:
    await failure.run(mailgun)


async def test_signed_or_rich_mime_goes_over_unchanged(mailgun: Pair) -> None:
    await mailgun.send(RICH_ENVELOPE, RICH)
    assert mailgun.fake.requests[0].body["message"] == [RICH]


async def test_unknown_domain_opens_the_breaker(mailgun: Pair) -> None:
    assert isinstance(mailgun.upstream, MailgunUpstream)
    mailgun.upstream.domain = "typo.example.com"
    error = await mailgun.failure()
    assert isinstance(error, PermanentError) and error.upstream_wide
    assert "Domain not found" in error.reason


async def test_message_over_the_size_limit_is_refused_before_sending(mailgun: Pair) -> None:
    mailgun.upstream.max_message_size = 100
    assert mailgun.upstream.refusal(ENVELOPE, MESSAGE) is not None
    error = await mailgun.failure()
    assert isinstance(error, TransientError) and not error.upstream_wide
    assert mailgun.fake.requests == []


async def test_hung_request_released_by_the_provider_is_ambiguous(mailgun: Pair) -> None:
    mailgun.fake.hang()
    sending = asyncio.create_task(mailgun.send())
    await mailgun.fake.hanging.wait()
    mailgun.fake.release()  # the fake then drops the connection without an answer
    with pytest.raises(TransientError) as info:
        await sending
    assert info.value.ambiguous and mailgun.fake.requests == []
