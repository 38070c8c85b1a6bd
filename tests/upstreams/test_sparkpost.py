from __future__ import annotations

import pytest

from relay.message import Envelope
from relay.outcomes import TransientError
from tests.upstreams.conftest import ENVELOPE, MESSAGE, FailureCase, Pair


async def test_raw_mime_and_every_envelope_recipient_reach_sparkpost(sparkpost: Pair) -> None:
    accepted = await sparkpost.send()

    sent = sparkpost.fake.requests[0]
    assert accepted.provider_id == sent.provider_id
    assert sent.headers["Authorization"] == sparkpost.fake.api_key
    assert [r["address"]["email"] for r in sent.body["recipients"]] == list(ENVELOPE.rcpt_tos)
    assert {r["address"]["header_to"] for r in sent.body["recipients"]} == {
        "Someone <to@example.net>"
    }
    assert sent.body["content"] == {"email_rfc822": MESSAGE.decode()}
    assert sent.body["return_path"] == "bounces@example.com"
    assert sent.body["options"] == {"open_tracking": False, "click_tracking": False}


async def test_the_relay_id_travels_as_transmission_metadata(sparkpost: Pair) -> None:
    """SparkPost copies metadata into every event's rcpt_meta: the way back to us."""
    await sparkpost.send(Envelope(ENVELOPE.mail_from, ENVELOPE.rcpt_tos, queue_id="01J5Z3K8Q9"))
    assert sparkpost.fake.requests[0].body["metadata"] == {"relay_id": "01J5Z3K8Q9"}


async def test_no_relay_id_no_metadata(sparkpost: Pair) -> None:
    await sparkpost.send()
    assert "metadata" not in sparkpost.fake.requests[0].body


async def test_failure_is_classified(sparkpost: Pair, failure: FailureCase) -> None:
    await failure.run(sparkpost)


async def test_null_sender_has_no_return_path(sparkpost: Pair) -> None:
    await sparkpost.send(Envelope("", ENVELOPE.rcpt_tos))
    assert "return_path" not in sparkpost.fake.requests[0].body


async def test_sending_limit_is_upstream_wide_and_transient(sparkpost: Pair) -> None:
    sparkpost.fake.fail(420, message="Exceed Sending Limit (hourly)")
    error = await sparkpost.failure()
    assert isinstance(error, TransientError) and error.upstream_wide
    assert "2101" in error.reason


@pytest.mark.parametrize("code", ["7001", "1502"])
async def test_sender_domain_or_busy_codes_fail_over(sparkpost: Pair, code: str) -> None:
    sparkpost.fake.fail(400, code=code, message="try elsewhere")
    error = await sparkpost.failure()
    assert isinstance(error, TransientError) and not error.upstream_wide


async def test_non_utf8_bytes_are_refused_rather_than_altered(sparkpost: Pair) -> None:
    latin1 = MESSAGE.replace(b"Hi there.", "Grüße".encode("latin-1"))
    assert sparkpost.upstream.refusal(ENVELOPE, latin1) is not None
    error = await sparkpost.failure(ENVELOPE, latin1)
    assert isinstance(error, TransientError) and "UTF-8" in error.reason
    assert sparkpost.fake.requests == []
