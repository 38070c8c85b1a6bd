"""SNS verification: signed messages pass; everything forged, stale or foreign is refused.

The relay's own HTTPSFetcher fetches the signing certificate from a loopback https server
that answers as `sns.eu-west-1.amazonaws.com` (trustme CA + pinned resolver), so the URL
checks are the production ones. "Rejected without fetching" is proven by the server's
request log staying empty.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay.inbound.sns import (
    FetchFailed,
    SNSMalformed,
    SNSRejected,
    SNSUnavailable,
    SNSVerifier,
    check_sns_url,
    string_to_sign,
)
from tests.fakes.ses_inbound import (
    CERT_URL,
    REGION,
    SNS_HOST,
    TOPIC_ARN,
    SNSCertServer,
    SNSSigner,
    sns_envelope,
    sns_timestamp,
)

NOW = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


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
async def verifier(cert_server: SNSCertServer) -> AsyncIterator[SNSVerifier]:
    fetcher = cert_server.fetcher()
    v = SNSVerifier(topics=[TOPIC_ARN], fetcher=fetcher, clock=lambda: NOW.timestamp())
    try:
        yield v
    finally:
        await fetcher.close()


def notification(**kw: Any) -> dict[str, Any]:
    kw.setdefault("timestamp", sns_timestamp(NOW - dt.timedelta(seconds=5)))
    return sns_envelope(json.dumps({"notificationType": "Received"}), **kw)


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def test_string_to_sign_matches_the_aws_guide_example() -> None:
    doc = {
        "Type": "Notification",
        "MessageId": "4d4dc071-ddbf-465d-bba8-08f81c89da64",
        "TopicArn": "arn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P",
        "Subject": "My subject",
        "Message": "My Test Message",
        "Timestamp": "2019-01-31T04:37:04.321Z",
    }
    assert string_to_sign(doc) == (
        b"Message\nMy Test Message\nMessageId\n4d4dc071-ddbf-465d-bba8-08f81c89da64\n"
        b"Subject\nMy subject\nTimestamp\n2019-01-31T04:37:04.321Z\n"
        b"TopicArn\narn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P\n"
        b"Type\nNotification\n"
    )
    del doc["Subject"]
    assert b"Subject" not in string_to_sign(doc)


@pytest.mark.parametrize("version", ["1", "2"])
async def test_signed_notification_verifies(
    version: str, signer: SNSSigner, verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    doc = signer.sign(
        notification(subject="Amazon SES Email Receipt Notification"), version=version
    )
    msg = await verifier.verify(body(doc))
    assert msg.type == "Notification"
    assert msg.topic_arn == TOPIC_ARN
    assert msg.subject == "Amazon SES Email Receipt Notification"
    assert json.loads(msg.message) == {"notificationType": "Received"}
    assert msg.signature_version == version
    assert msg.dedupe_key == f"sns:{doc['MessageId']}"
    assert cert_server.requests == [CERT_URL.removeprefix(f"https://{SNS_HOST}")]


async def test_message_with_newlines_and_unicode_verifies(
    signer: SNSSigner, verifier: SNSVerifier
) -> None:
    doc = sns_envelope("line one\nline two — ünïcode\n", subject=None, timestamp=sns_timestamp(NOW))
    msg = await verifier.verify(body(signer.sign(doc, version="2")))
    assert msg.message == "line one\nline two — ünïcode\n"


async def test_certificate_is_cached(
    signer: SNSSigner, verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    for _ in range(3):
        await verifier.verify(body(signer.sign(notification())))
    assert len(cert_server.requests) == 1


async def test_subscription_confirmation_is_verified_and_confirmed(
    signer: SNSSigner, verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    doc = signer.sign(
        sns_envelope(
            "You have chosen to subscribe...",
            msg_type="SubscriptionConfirmation",
            timestamp=sns_timestamp(NOW),
        )
    )
    msg = await verifier.verify(body(doc))
    assert msg.type == "SubscriptionConfirmation"
    assert msg.token == doc["Token"]
    answer = await verifier.confirm_subscription(msg)
    assert f"{TOPIC_ARN}:sub-1" in answer
    assert cert_server.confirmations == [doc["Token"]]


async def test_unsubscribe_confirmation_verifies(signer: SNSSigner, verifier: SNSVerifier) -> None:
    doc = signer.sign(
        sns_envelope(
            "You have chosen to deactivate...",
            msg_type="UnsubscribeConfirmation",
            timestamp=sns_timestamp(NOW),
        ),
        version="2",
    )
    msg = await verifier.verify(body(doc))
    assert msg.type == "UnsubscribeConfirmation"


# -- refused, and never fetched ---------------------------------------------------------------


async def test_unsigned_message_is_rejected(
    verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    with pytest.raises(SNSRejected, match="not signed"):
        await verifier.verify(body(notification()))
    assert cert_server.requests == []


async def test_tampered_message_is_rejected(signer: SNSSigner, verifier: SNSVerifier) -> None:
    doc = signer.sign(notification())
    doc["Message"] = doc["Message"].replace("Received", "Bounce")
    with pytest.raises(SNSRejected, match="does not verify"):
        await verifier.verify(body(doc))


async def test_signature_from_another_key_is_rejected(verifier: SNSVerifier) -> None:
    forged = SNSSigner().sign(notification())
    with pytest.raises(SNSRejected, match="does not verify"):
        await verifier.verify(body(forged))


async def test_signature_version_mismatch_is_rejected(
    signer: SNSSigner, verifier: SNSVerifier
) -> None:
    doc = signer.sign(notification(), version="1")
    doc["SignatureVersion"] = "2"
    with pytest.raises(SNSRejected):
        await verifier.verify(body(doc))
    doc["SignatureVersion"] = "3"
    with pytest.raises(SNSRejected, match="SignatureVersion"):
        await verifier.verify(body(doc))


async def test_stale_message_is_rejected(
    signer: SNSSigner, verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    old = notification(timestamp=sns_timestamp(NOW - dt.timedelta(hours=1, seconds=1)))
    with pytest.raises(SNSRejected, match="stale"):
        await verifier.verify(body(signer.sign(old)))
    future = notification(timestamp=sns_timestamp(NOW + dt.timedelta(minutes=10)))
    with pytest.raises(SNSRejected, match="future"):
        await verifier.verify(body(signer.sign(future)))
    assert cert_server.requests == []


async def test_max_age_is_configurable(signer: SNSSigner, cert_server: SNSCertServer) -> None:
    fetcher = cert_server.fetcher()
    strict = SNSVerifier(
        topics=[TOPIC_ARN], fetcher=fetcher, max_age=60, clock=lambda: NOW.timestamp()
    )
    try:
        doc = signer.sign(notification(timestamp=sns_timestamp(NOW - dt.timedelta(minutes=2))))
        with pytest.raises(SNSRejected, match="stale"):
            await strict.verify(body(doc))
    finally:
        await fetcher.close()


async def test_foreign_topic_is_rejected_even_when_signed(
    signer: SNSSigner, verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    doc = signer.sign(notification(topic_arn=f"arn:aws:sns:{REGION}:999999999999:evil"))
    with pytest.raises(SNSRejected, match="not allowed"):
        await verifier.verify(body(doc))
    assert cert_server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/SimpleNotificationService-x.pem",
        "https://sns.eu-west-1.amazonaws.com.evil.example/x.pem",
        "https://evilsns.eu-west-1.amazonaws.com/x.pem",
        "https://sns.eu-west-1.amazonaws.com@evil.example/x.pem",
        "https://user@sns.eu-west-1.amazonaws.com/x.pem",
        "https://sns.eu-west-1.amazonaws.com:8443/x.pem",
        "http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.txt",
        "https://sns.eu-west-1.amazonaws.com/x.pem?redirect=https://evil.example/",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem",
        "file:///etc/passwd.pem",
        "https://127.0.0.1/x.pem",
    ],
)
async def test_bad_certificate_url_is_rejected_without_fetching(
    url: str, signer: SNSSigner, verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    doc = signer.sign(notification(), cert_url=url)
    with pytest.raises(SNSRejected):
        await verifier.verify(body(doc))
    assert cert_server.requests == []


async def test_rejection_never_calls_the_fetcher(signer: SNSSigner) -> None:
    calls: list[str] = []

    async def fetcher(url: str) -> bytes:
        calls.append(url)
        return signer.cert_pem

    v = SNSVerifier(topics=[TOPIC_ARN], fetcher=fetcher, clock=lambda: NOW.timestamp())
    doc = signer.sign(notification(), cert_url="https://evil.example/x.pem")
    with pytest.raises(SNSRejected):
        await v.verify(body(doc))
    assert calls == []
    await v.verify(body(signer.sign(notification())))
    assert calls == [CERT_URL]


def test_china_partition_host_is_accepted() -> None:
    check_sns_url(
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem",
        region="cn-north-1",
        what="SigningCertURL",
        pem=True,
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b"{}",
        b'{"Type": "Bogus"}',
        json.dumps({"Type": "Notification", "Message": 3}).encode(),
        b"\xff\xfe",
    ],
)
async def test_malformed_body_is_400(raw: bytes, verifier: SNSVerifier) -> None:
    with pytest.raises(SNSMalformed) as info:
        await verifier.verify(raw)
    assert info.value.status == 400


async def test_rejections_map_to_403(verifier: SNSVerifier) -> None:
    with pytest.raises(SNSRejected) as info:
        await verifier.verify(body(notification()))
    assert info.value.status == 403


async def test_unreachable_certificate_is_503_so_sns_retries(
    signer: SNSSigner, verifier: SNSVerifier, cert_server: SNSCertServer
) -> None:
    cert_server.fail_cert = True
    with pytest.raises(SNSUnavailable) as info:
        await verifier.verify(body(signer.sign(notification())))
    assert info.value.status == 503
    cert_server.fail_cert = False
    await verifier.verify(body(signer.sign(notification())))  # not cached as a failure


async def test_certificate_that_is_not_a_certificate_is_rejected(signer: SNSSigner) -> None:
    async def fetcher(url: str) -> bytes:
        return b"<html>hello</html>"

    v = SNSVerifier(topics=[TOPIC_ARN], fetcher=fetcher, clock=lambda: NOW.timestamp())
    with pytest.raises(SNSRejected, match="PEM"):
        await v.verify(body(signer.sign(notification())))


async def test_subscribe_url_elsewhere_is_never_visited(
    signer: SNSSigner, cert_server: SNSCertServer
) -> None:
    calls: list[str] = []

    async def fetcher(url: str) -> bytes:
        calls.append(url)
        if url == CERT_URL:
            return signer.cert_pem
        raise FetchFailed("unexpected")

    v = SNSVerifier(topics=[TOPIC_ARN], fetcher=fetcher, clock=lambda: NOW.timestamp())
    doc = sns_envelope("confirm", msg_type="SubscriptionConfirmation", timestamp=sns_timestamp(NOW))
    doc["SubscribeURL"] = "https://evil.example/?Action=ConfirmSubscription"
    msg = await v.verify(body(signer.sign(doc)))  # the signature is fine...
    with pytest.raises(SNSRejected, match="SubscribeURL"):
        await v.confirm_subscription(msg)  # ...but the relay won't go there
    assert calls == [CERT_URL]


async def test_lone_surrogate_in_a_signed_field_is_malformed_not_a_crash(
    verifier: SNSVerifier,
) -> None:
    doc = notification()
    doc["Message"] = "\ud800"  # valid JSON ("\\ud800"), but no UTF-8 string to sign
    with pytest.raises(SNSMalformed, match="Message is not Unicode text"):
        await verifier.verify(json.dumps(doc).encode())
