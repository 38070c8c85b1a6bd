from __future__ import annotations

import pytest

from relay.message import Envelope
from relay.outcomes import PermanentError, TransientError, UpstreamError
from tests.upstreams.conftest import ENVELOPE, MESSAGE, RICH, RICH_ENVELOPE, FailureCase, Pair


async def test_envelope_recipients_are_delivered_with_bcc_kept(postmark: Pair) -> None:
    accepted = await postmark.send()

    sent = postmark.fake.requests[0]
    assert accepted.provider_id == sent.provider_id
    assert sent.headers["X-Postmark-Server-Token"] == postmark.fake.api_key
    body = sent.body
    assert (body["From"], body["To"], body["Cc"], body["Bcc"]) == (
        "Sender <sender@example.com>",
        "Someone <to@example.net>",
        "cc@example.net",
        "hidden@example.org",
    )
    assert body["Subject"] == "Hello" and body["TextBody"] == "Hi there.\n"
    assert body["MessageStream"] == "outbound"
    assert body["Metadata"] == {"relay_id": "01HRELAYID"}
    assert {"Name": "Message-ID", "Value": "<1@example.com>"} in body["Headers"]


async def test_failure_is_classified(postmark: Pair, failure: FailureCase) -> None:
    await failure.run(postmark)


async def test_rich_message_keeps_inline_image_and_encodes_names(postmark: Pair) -> None:
    await postmark.send(RICH_ENVELOPE, RICH)

    body = postmark.fake.requests[0].body
    assert body["From"] == "=?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <juergen@example.com>"
    assert body["Subject"] == "Überweisung für März"
    assert body["Bcc"] == "bcc@example.org"
    logo, pdf = body["Attachments"]
    assert logo["ContentID"] == "cid:logo@example.com" and "ContentID" not in pdf
    assert pdf["Name"] == "Rechnung März.pdf"


@pytest.mark.parametrize(
    ("code", "kind", "wide"),
    [
        (10, PermanentError, True),  # bad or missing token
        (405, PermanentError, True),  # not allowed to send: out of credits
        (412, PermanentError, True),  # account pending
        (100, TransientError, True),  # maintenance
        (429, TransientError, False),  # rate limit
        (400, TransientError, False),  # sender signature not found: another upstream may send
        (300, PermanentError, False),  # invalid email request
        (406, PermanentError, False),  # inactive recipient
        (411, PermanentError, False),  # forbidden attachment type
    ],
)
async def test_error_codes_are_classified(
    postmark: Pair, code: int, kind: type[UpstreamError], wide: bool
) -> None:
    postmark.fake.fail(422, code=code)
    error = await postmark.failure()
    assert type(error) is kind and error.upstream_wide is wide
    assert f"ErrorCode {code}" in error.reason


async def test_more_than_fifty_recipients_are_refused_before_sending(postmark: Pair) -> None:
    many = Envelope(
        ENVELOPE.mail_from, ENVELOPE.rcpt_tos + tuple(f"r{i}@example.org" for i in range(48))
    )
    assert postmark.upstream.refusal(many, MESSAGE) is not None
    error = await postmark.failure(many)
    assert isinstance(error, TransientError) and "50" in error.reason
    assert postmark.fake.requests == []
